"""Experiments with a verdict: zero-shot segmentation against baselines, head ablation on group-annotated data."""
