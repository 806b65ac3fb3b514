"""Pipelines that read a run and write derived tables into it: textspan, ... (one module each)."""
