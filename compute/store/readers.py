"""Reading per-head contributions (and other vector columns) out of a run as numpy.

Whole-run readers (`read_head`, `read_components`) hold every image at once; the steps after
compute use the streaming ones (`iter_head`, `iter_chunks`), whose memory is one chunk's rows whatever the
number of images.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.store.layout import RunStore


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



def read_images(store: RunStore, columns: list[str] | None = None) -> pa.Table:
    """The images table sorted by image_id (`columns` to leave the embeddings out)."""
    files = sorted((store.root / "images").glob("*.parquet"))
    if not files:
        raise AtlasError(f"{store.root}: no image rows")
    table = pa.concat_tables(pq.read_table(f, columns=columns) for f in files)
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


@dataclass
class ChunkRows:
    """One committed chunk's rows, aligned: image i of `ids` is row i of every array."""
    key: str
    ids: np.ndarray                      # [n]
    embedding: np.ndarray | None         # [n, D]
    components: np.ndarray | None        # [n, K, D] in component_layout order
    heads: np.ndarray | None             # [len(pairs), n, D]
    labels: list | None = None


def chunk_keys(store: RunStore) -> list[str]:
    """The committed chunks, in a stable order."""
    keys = sorted(m["key"] for m in store.markers() if m.get("paths"))
    if not keys:
        raise AtlasError(f"{store.root}: no committed chunks; is the run computed?")
    return keys


def iter_chunks(store: RunStore, pairs: list[tuple[int, int]] = (), embedding: bool = True,
                components: bool = False, labels: bool = False) -> Iterator[ChunkRows]:
    """Every chunk's rows: the image embeddings, components and the listed heads, one chunk at a time.
    A chunk's part files share its key and its row order, which the store guarantees (see store.py)."""
    for key in chunk_keys(store):
        name = f"part-{key}.parquet"
        img = pq.read_table(store.root / "images" / name, columns=["image_id", "embedding", "label"]
                            if labels else ["image_id", "embedding"])
        ids = img.column("image_id").to_numpy()
        comp = None
        if components:
            flat = vector_column(pq.read_table(store.root / "components" / name, columns=["contribution"]), "contribution")
            comp = flat.reshape(len(ids), -1, flat.shape[1])
        H = None
        if pairs:
            H = np.stack([vector_column(pq.read_table(store.head_dir(l, h) / name, columns=["contribution"]), "contribution")
                          for l, h in pairs])
        yield ChunkRows(key, ids, vector_column(img, "embedding") if embedding else None, comp, H,
                        img.column("label").to_pylist() if labels else None)


def head_means(store: RunStore, pairs: list[tuple[int, int]]) -> np.ndarray:
    """[len(pairs), D] float64: each listed head's mean contribution over the run's images, in one streamed pass
    (memory: one chunk's rows)."""
    total, n = 0.0, 0
    for chunk in iter_chunks(store, pairs, embedding=False):
        total = total + chunk.heads.astype(np.float64).sum(1)
        n += len(chunk.ids)
    return np.asarray(total) / max(n, 1)


def read_rows(files: list, column: str, wanted: np.ndarray) -> np.ndarray:
    """The `column` vectors of the image_ids in `wanted` (sorted), streamed file by file: [len(wanted), D]."""
    out = None
    found = 0
    for f in files:
        t = pq.read_table(f, columns=["image_id", column])
        ids = t.column("image_id").to_numpy()
        hit = np.isin(ids, wanted)
        if not hit.any():
            continue
        X = vector_column(t.filter(pa.array(hit)), column)
        if out is None:
            out = np.zeros((len(wanted), X.shape[1]), np.float32)
        out[np.searchsorted(wanted, ids[hit])] = X
        found += int(hit.sum())
    if found != len(wanted):
        raise AtlasError(f"{len(wanted) - found} of the requested images are missing from {files[0].parent if files else '?'}")
    return out
