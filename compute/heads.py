"""Reading per-head contributions (and other vector columns) out of a run as numpy."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import AtlasError
from .store import RunStore


def vector_column(table: pa.Table, name: str) -> np.ndarray:
    """A fixed-size (or variable) list<float> column -> [n, D] float32."""
    col = table.column(name).combine_chunks()
    if len(col) == 0:
        return np.zeros((0, 0), np.float32)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return flat.reshape(len(col), -1)


def head_files(store: RunStore, layer: int, head: int) -> list:
    files = sorted(store.head_dir(layer, head).glob("*.parquet"))
    if not files:
        raise AtlasError(f"{store.root}: no stored rows for layer {layer} head {head}")
    return files


def iter_head(store: RunStore, layer: int, head: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image_ids, contributions [n, D]) one stored part file at a time: memory bounded by the chunk size."""
    for f in head_files(store, layer, head):
        table = pq.read_table(f)
        yield table.column("image_id").to_numpy(), vector_column(table, "contribution")


def read_head(store: RunStore, layer: int, head: int) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids sorted, contributions [N, D]) for one head."""
    table = pa.concat_tables(pq.read_table(f) for f in head_files(store, layer, head))
    ids = table.column("image_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], vector_column(table, "contribution")[order]


def read_heads(store: RunStore, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids, [len(pairs), N, D]); every head of a run holds the same images."""
    ids0, out = None, []
    for layer, head in pairs:
        ids, c = read_head(store, layer, head)
        if ids0 is not None and not np.array_equal(ids, ids0):
            raise AtlasError(f"{store.root}: heads hold different images; is the run complete?")
        ids0 = ids
        out.append(c)
    return ids0, np.stack(out)


def read_images(store: RunStore) -> pa.Table:
    files = sorted((store.root / "images").glob("*.parquet"))
    if not files:
        raise AtlasError(f"{store.root}: no image rows")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    return table.take(pc.sort_indices(table, [("image_id", "ascending")]))


def read_components(store: RunStore) -> tuple[np.ndarray, list[str], list[int | None], np.ndarray]:
    """(image_ids [N], kinds [K], layers [K], contributions [N, K, D]) in stored component order."""
    files = sorted((store.root / "components").glob("*.parquet"))
    if not files:
        raise AtlasError(f"{store.root}: no component rows")
    table = pa.concat_tables(pq.read_table(f) for f in files)
    ids = table.column("image_id").to_numpy()
    vec = vector_column(table, "contribution")
    kinds = table.column("kind").cast(pa.string()).to_pylist()
    layers = table.column("layer").to_pylist()
    uniq, first = np.unique(ids, return_index=True)
    K = len(ids) // len(uniq)
    order = np.argsort(ids, kind="stable")
    start = int(first[0])
    return uniq, kinds[start:start + K], layers[start:start + K], vec[order].reshape(len(uniq), K, -1)
