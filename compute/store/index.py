"""Per-head vector indexes: memory-mapped float32 matrices derived from the Parquet store, for exact top-k.

    RUN/_index/heads/layer=L/head=H/vectors.npy    float32 [N, D] (memory-mapped when read)
    RUN/_index/heads/layer=L/head=H/ids.npy        int64 [N]
    RUN/_index/heads/layer=L/head=H/source.json    the part files (name, size, mtime) it was built from

Why: a query over one head must not re-read Parquet (2 GB for a 1M x 512 head) nor keep whole heads in the
process (the OS page cache keeps the hot ones, shared by every dashboard process). Measured against the
alternatives in docs/benchmarks.md (benchmarks/scale.py). The index is a cache: `clip-atlas index RUN` builds
it (streamed: one part file in memory at a time), a stale or missing index is simply not used, and deleting
`_index/` loses nothing. Results are exact: brute-force scores in float32 over every row.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.store.layout import RunStore
from compute.store.readers import head_files, vector_column

INDEX_DIR = "_index"
#: Rows scored per block: bounds the temporary float32 copy of a block, whatever N.
BLOCK_ROWS = 1 << 18


def index_dir(store: RunStore, layer: int, head: int) -> Path:
    return store.root / INDEX_DIR / "heads" / f"layer={int(layer)}" / f"head={int(head)}"


def _signature(files: list[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def build_head_index(store: RunStore, layer: int, head: int) -> Path:
    """Write (or rewrite) one head's index from its part files, streamed into a memory-mapped file."""
    files = head_files(store, layer, head)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    first = pq.read_table(files[0], columns=["contribution"])
    d = vector_column(first.slice(0, 1), "contribution").shape[1]
    out = index_dir(store, layer, head)
    out.mkdir(parents=True, exist_ok=True)
    tmp_v, tmp_i = out / ".vectors.npy.tmp", out / ".ids.npy.tmp"
    V = np.lib.format.open_memmap(tmp_v, mode="w+", dtype=np.float32, shape=(n, d))
    ids = np.lib.format.open_memmap(tmp_i, mode="w+", dtype=np.int64, shape=(n,))
    at = 0
    for f in files:
        t = pq.read_table(f)
        k = t.num_rows
        V[at:at + k] = vector_column(t, "contribution")
        ids[at:at + k] = t.column("image_id").to_numpy()
        at += k
    V.flush()
    ids.flush()
    del V, ids
    tmp_v.replace(out / "vectors.npy")
    tmp_i.replace(out / "ids.npy")
    (out / "source.json").write_text(json.dumps(_signature(files)))
    return out


def open_head_index(store: RunStore, layer: int, head: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids, memory-mapped vectors) when a current index exists, else None."""
    out = index_dir(store, layer, head)
    try:
        if json.loads((out / "source.json").read_text()) != _signature(head_files(store, layer, head)):
            return None
        return np.load(out / "ids.npy", mmap_mode="r"), np.load(out / "vectors.npy", mmap_mode="r")
    except (OSError, ValueError, AtlasError):
        return None


def row_norms(M: np.ndarray) -> np.ndarray:
    """[N] float32: each row's norm, block by block (bounded memory over a memory map)."""
    out = np.empty(len(M), np.float32)
    for i in range(0, len(M), BLOCK_ROWS):
        block = M[i:i + BLOCK_ROWS]
        out[i:i + BLOCK_ROWS] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float32))
    return out


def top_k(ids: np.ndarray, M: np.ndarray, query: np.ndarray, k: int, exclude: int | None = None,
          by: str = "cosine", norms: np.ndarray | None = None) -> list[tuple[int, float, float]]:
    """Exact top-k over all rows of M (in memory or memory-mapped), scored block by block: (image_id, dot product,
    cosine) per hit, ranked by the cosine (neighbours: which images the head sends the same way, whatever their
    contribution's size; the raw dot product let a few large contributions win every query) or, with
    by="dot", by the dot product (projection on a unit direction: the images that go furthest along it).
    `norms` (row_norms(M), which a caller caches beside M) saves a pass for the cosine."""
    q = np.asarray(query, np.float32).reshape(-1)
    n = len(ids)
    scores = np.empty(n, np.float32)
    qn = float(np.linalg.norm(q)) or 1.0
    for i in range(0, n, BLOCK_ROWS):
        block = M[i:i + BLOCK_ROWS]
        np.dot(block, q, out=scores[i:i + BLOCK_ROWS])
        if by == "cosine":
            n_block = (norms[i:i + BLOCK_ROWS] if norms is not None else row_norms(block)) * qn
            scores[i:i + BLOCK_ROWS] /= np.where(n_block > 0, n_block, np.inf)
    dropped = 0
    if exclude is not None:
        hit = np.asarray(ids) == exclude
        scores[hit] = -np.inf
        dropped = int(hit.sum())
    k = max(0, min(k, n - dropped))
    if k == 0:
        return []
    top = np.argpartition(scores, n - k)[n - k:]      # in place of a negated copy: one pass fewer over N
    top = top[np.argsort(-scores[top], kind="stable")]
    rows = np.sort(top)                                # ascending reads from a memory map
    R = np.asarray(M[rows], np.float32)
    dot_of = dict(zip(rows.tolist(), (R @ q).tolist()))
    norm_of = dict(zip(rows.tolist(), np.linalg.norm(R, axis=1).tolist()))
    return [(int(ids[i]), float(dot_of[int(i)]),
             float(dot_of[int(i)] / (qn * norm_of[int(i)])) if norm_of[int(i)] else 0.0) for i in top]
