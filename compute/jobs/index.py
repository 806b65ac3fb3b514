"""`clip-atlas index RUN`: build the memory-mapped per-head indexes (store/index.py holds their format)."""
from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from compute.store.index import INDEX_DIR, build_head_index, open_head_index
from compute.store.layout import RunStore, stored_head_layers


def build_index(run: str | Path, layers: list[int] | None = None, progress: bool = True) -> dict:
    """`clip-atlas index RUN`: every stored head's index (of `layers`, default all stored); skips current ones."""
    store = RunStore(run)
    man = store.require_complete()
    chosen = stored_head_layers(man, layers, run)
    pairs = [(l, h) for l in chosen for h in range(man["heads"])]
    built = 0
    for layer, head in tqdm(pairs, desc="index", unit="head", disable=not progress):
        if open_head_index(store, layer, head) is None:
            build_head_index(store, layer, head)
            built += 1
    return {"heads": len(pairs), "built": built, "path": str(store.root / INDEX_DIR)}
