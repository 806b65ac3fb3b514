"""Per-head top-k through the dashboard's query layer against numpy brute force, and live segmentation latency.

    python benchmarks/queries.py [--images 50000] [--heads 48] [--dim 512]

The synthetic store (written once under benchmarks/.cache/, git-ignored) has the real layout:
heads/layer=L/head=H/part-*.parquet, so a query reads one head's files only.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, p, timeit, verdict  # noqa: E402
from compute.store.layout import RunStore, vectors, write_table_atomic  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"


def synthetic_store(n: int, heads: int, dim: int) -> Path:
    root = CACHE / f"store-{n}-{heads}-{dim}"
    run = root / "synthetic"
    if (run / "manifest.json").is_file():
        return run
    shutil.rmtree(root, ignore_errors=True)
    store = RunStore(run)
    rng = np.random.default_rng(0)
    ids = np.arange(n, dtype=np.int64)
    layers = [8, 9, 10, 11]
    per_layer = heads // len(layers)
    for layer in layers:
        for h in range(per_layer):
            x = rng.standard_normal((n, dim), dtype=np.float32)
            write_table_atomic(pa.table({"image_id": ids, "contribution": vectors(x)}), store.head_dir(layer, h) / "part-0.parquet")
    write_table_atomic(pa.table({"image_id": ids, "path": [f"{i}.png" for i in ids], "label": [None] * n,
                                 "embedding": vectors(np.zeros((n, 8), np.float32))}), run / "images" / "part-0.parquet")
    store.write_manifest({"schema_version": 1, "model": "synthetic", "status": "complete", "layers": 12, "heads": per_layer,
                          "head_layers": layers, "image_count": n, "images_root": str(root), "embed_dim": dim})
    return run


def topk_benchmark(run: Path, repeat: int) -> None:
    from compute.store.query import Store
    store = Store(run.parent)
    info = store.run(run.name)
    rng = np.random.default_rng(1)
    layer, head = 11, 3
    # numpy baseline: the same head's matrix, pre-normalised, in memory
    from compute.store.readers import read_head
    _, M = read_head(RunStore(run), layer, head)
    M = M / np.linalg.norm(M, axis=1, keepdims=True)
    queries = [rng.standard_normal(M.shape[1]).astype(np.float32) for _ in range(repeat)]
    t = time.perf_counter()
    store.head_top_k_sql(info, layer, head, queries[0], k=10)
    cold_sql = time.perf_counter() - t
    t = time.perf_counter()
    store.head_top_k(info, layer, head, queries[0], k=10)
    first = time.perf_counter() - t
    print(f"first query of a head (reads its Parquet through DuckDB into the query layer's cache): {first * 1000:.0f} ms; "
          f"the same query answered by DuckDB SQL from Parquet (list_dot_product): {cold_sql * 1000:.0f} ms")
    t_db, t_np = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.head_top_k(info, layer, head, q, k=10)
        t_db.append(time.perf_counter() - t)
        t = time.perf_counter()
        scores = M @ q
        top = np.argpartition(-scores, 10)[:10]
        top = top[np.argsort(-scores[top])]
        t_np.append(time.perf_counter() - t)
        assert len(hits) == 10
    ratio = median(t_db) / median(t_np)
    print(f"per-head top-10 over {M.shape[0]} x {M.shape[1]}, repeated queries: query layer p50 {median(t_db) * 1000:.1f} ms, "
          f"p95 {p(t_db, 0.95) * 1000:.1f} ms | numpy in memory p50 {median(t_np) * 1000:.1f} ms, "
          f"p95 {p(t_np, 0.95) * 1000:.1f} ms -> {ratio:.2f}x numpy (target <= 3x: {verdict(ratio <= 3)})")


def segmentation_benchmark(spec: str, repeat: int, target_ms: float | None) -> None:
    from PIL import Image

    from compute.maths.segment import heatmap, upsample
    from compute.models import load_model
    loaded = load_model(spec)
    rng = np.random.default_rng(2)
    size = loaded.info.image_size
    text = loaded.encode_texts(["a red circle"])[0]
    images = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(repeat)]
    times = []
    for img in images:
        t = time.perf_counter()
        heat = heatmap(loaded.token_maps(img), text)
        upsample(heat, size)
        times.append(time.perf_counter() - t)
    t_text = median(timeit(lambda: loaded.encode_texts(["a red circle"]), 5))
    line = f"live topic segmentation, {spec}: p50 {median(times) * 1000:.0f} ms, p95 {p(times, 0.95) * 1000:.0f} ms " \
           f"(all layers' token maps; + {t_text * 1000:.0f} ms to encode a new text)"
    if target_ms:
        line += f" (target p50 <= {target_ms:.0f} ms: {verdict(median(times) * 1000 <= target_ms)})"
    print(line)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--heads", type=int, default=48)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args()
    t = time.perf_counter()
    run = synthetic_store(a.images, a.heads, a.dim)
    print(f"synthetic store ready in {time.perf_counter() - t:.0f} s: {run}")
    topk_benchmark(run, a.repeat)
    segmentation_benchmark("shapes", 20, 300)
    segmentation_benchmark("ViT-B-32:random", 10, None)
