"""The store: where every file of a run lives (layout), how it is read (readers, the memory-mapped index) and the
read-only DuckDB query layer."""
