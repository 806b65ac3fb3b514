"""Scale: peak memory of every step after compute at 10k and 100k images, and per-head retrieval up to 1M.

    python benchmarks/scale.py [--sizes 10000,100000] [--retrieval 100000,1000000] [--steps textspan,label,metrics,index]

Stores are synthetic but written by the real writer (`RunStore.write_chunk`, chunks of 1,000 images) in the
ViT-B-16 shape: 12 layers, heads of the last 4 stored (48 heads x D 512), 38 components per image; each head's
rows are rank 64 (a head writes a head_dim vector), the embedding is the sum of the components. Sizes on disk:
about 17 KB x 12 per image (10k: 1.9 GB, 100k: 19 GB). Each step runs as its own CLI process and its peak RSS
is its own (`peak_rss_of`). Retrieval stores hold one head (1M: 2 GB of Parquet + 2 GB of index).
Text encoding of the general pool by a random ViT-B-16 on 2 CPU cores is most of textspan's time.
Everything lives under benchmarks/.cache/ (git-ignored); delete it afterwards.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, p, peak_rss_of, verdict  # noqa: E402
from compute.store.layout import Chunk, RunStore  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "scale"
LAYERS, HEADS, D, HEAD_LAYERS = 12, 12, 512, [8, 9, 10, 11]
CHUNK = 1000


def synthetic_run(n: int, head_layers: list[int] = HEAD_LAYERS, heads: int = HEADS) -> Path:
    """A complete run of n images in the real layout (written once, reused)."""
    from compute.maths.decompose import component_layout
    run = CACHE / f"run-{n}-{len(head_layers)}x{heads}" / "synthetic"
    if (run / "manifest.json").is_file() and RunStore(run).manifest().get("status") == "complete":
        return run
    shutil.rmtree(run.parent, ignore_errors=True)
    store = RunStore(run)
    kinds, comp_layers = component_layout(LAYERS)
    store.start({"model": "ViT-B-16:random", "architecture": "ViT-B-16", "tag": "random", "random_weights": True,
                 "layers": LAYERS, "heads": heads, "width": 768, "embed_dim": D, "patch_grid": [14, 14],
                 "image_size": [224, 224], "pool_type": "tok", "head_layers": head_layers,
                 "images_root": str(run.parent), "image_limit": None, "store_dtype": "float32",
                 "component_kinds": ["embed", "attn", "attn_bias", "mlp", "ln_bias"]}, identity=())
    rng = np.random.default_rng(0)
    bases = rng.standard_normal((len(head_layers), heads, 64, D)).astype(np.float32) / 64
    t0 = time.time()
    for start in range(0, n, CHUNK):
        b = min(CHUNK, n - start)
        ch = Chunk()
        ch.image_ids = list(range(start + 1, start + b + 1))
        ch.paths = [f"{i:07d}.png" for i in ch.image_ids]
        ch.labels = [None] * b
        z = rng.standard_normal((b, len(head_layers), heads, 64)).astype(np.float32)
        H = np.einsum("blhk,lhkd->blhd", z, bases)                          # [b, Ls, H, D], rank 64 per head
        comp = rng.standard_normal((b, len(kinds), D)).astype(np.float32) * 0.01
        for li, layer in enumerate(head_layers):
            comp[:, kinds.index("attn") + 3 * layer] = H[:, li].sum(1)      # attn of a stored layer = its heads
        emb = comp.sum(1)
        ch.embeddings, ch.components, ch.heads = [emb], [(comp, kinds, comp_layers)], [H]
        store.write_chunk(ch, head_layers, rank=0)
        if start % (20 * CHUNK) == 0:
            print(f"  writing {n:,} images: {start + b:,} ({(start + b) / max(time.time() - t0, 1e-9):.0f} img/s)", flush=True)
    store.finish(store.usable_markers())
    return run


def steps_memory(sizes: list[int], steps: list[str]) -> None:
    cli = [sys.executable, "-m", "compute.cli"]
    commands = {"textspan": ["textspan"], "label": ["label"], "metrics": ["metrics"], "index": ["index"]}
    print(f"\nPeak RSS per step (own process), ViT-B-16 shape (48 heads x D {D}):")
    results: dict[str, dict[int, tuple[float, float]]] = {s: {} for s in steps}
    for n in sizes:
        run = synthetic_run(n)
        for step in steps:
            t = time.time()
            rss = peak_rss_of(cli + commands[step] + [str(run)])
            results[step][n] = (rss / 2**30, time.time() - t)
            print(f"  {step:9s} {n:>9,} images: peak {rss / 2**30:5.2f} GiB, {time.time() - t:6.0f} s", flush=True)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        for step in steps:
            grow = results[step][hi][0] - results[step][lo][0]
            print(f"  {step:9s} {hi:,} vs {lo:,}: +{grow:.2f} GiB (target < 1 GiB: {verdict(grow < 1.0)})")


def retrieval_run(n: int) -> Path:
    """One head (layer 11, head 0) of n rank-64 rows, in the store's head layout (no components: 1M rows of those
    would be 78 GB), with the manifest the query layer needs."""
    import pyarrow as pa

    from compute.store.layout import vectors, write_table_atomic
    run = CACHE / f"retrieval-{n}" / "synthetic"
    if (run / "manifest.json").is_file():
        return run
    shutil.rmtree(run.parent, ignore_errors=True)
    store = RunStore(run)
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, D)).astype(np.float32) / 64
    step = 50_000
    for start in range(0, n, step):
        b = min(step, n - start)
        ids = np.arange(start + 1, start + b + 1, dtype=np.int64)
        x = rng.standard_normal((b, 64)).astype(np.float32) @ basis
        write_table_atomic(pa.table({"image_id": ids, "contribution": vectors(x)}),
                           store.head_dir(11, 0) / f"part-{start:08d}.parquet")
        write_table_atomic(pa.table({"image_id": ids, "path": [f"{i:07d}.png" for i in ids],
                                     "label": pa.nulls(b, pa.string()), "embedding": vectors(np.zeros((b, 1), np.float32))}),
                           run / "images" / f"part-{start:08d}.parquet")
    store.write_manifest({"schema_version": 1, "model": "ViT-B-16:random", "status": "complete", "layers": LAYERS,
                          "heads": 1, "head_layers": [11], "image_count": n, "images_root": str(run.parent),
                          "embed_dim": D})
    return run


def retrieval(sizes: list[int], repeat: int = 20) -> None:
    from compute.store.index import build_head_index
    from compute.store.query import Store
    print(f"\nPer-head retrieval, top-10 by dot product, D {D} (exact):")
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((repeat, D)).astype(np.float32)
    for n in sizes:
        run = retrieval_run(n)
        t = time.time()
        build_head_index(RunStore(run), 11, 0)
        build = time.time() - t
        # the first query in a fresh process (index files may be in the OS page cache: they were just written)
        first = subprocess.run([sys.executable, "-c", (
            "import sys, time, numpy as np; sys.path.insert(0, '.')\n"
            "from compute.store.query import Store\n"
            f"s = Store({str(run.parent)!r}); info = s.run('synthetic'); q = np.ones({D}, np.float32)\n"
            "t = time.perf_counter(); s.head_top_k(info, 11, 0, q, k=10); print(time.perf_counter() - t)")],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
        first_s = float(first.stdout.strip().splitlines()[-1])
        store = Store(run.parent)
        info = store.run("synthetic")
        ours = []
        for q in queries:
            t = time.perf_counter()
            store.head_top_k(info, 11, 0, q, k=10)
            ours.append(time.perf_counter() - t)
        line = f"  {n:>9,} images: index built in {build:5.1f} s; first query {first_s:5.2f} s; p50 {1e3 * median(ours):6.1f} ms, p95 {1e3 * p(ours, 0.95):6.1f} ms"
        if n <= 200_000:
            from compute.store.readers import read_head
            _, M = read_head(RunStore(run), 11, 0)
            M = M / np.linalg.norm(M, axis=1, keepdims=True)               # the baseline: pre-normalised, in memory
            base = []
            for q in queries:
                t = time.perf_counter()
                s = M @ q
                top = np.argpartition(-s, 9)[:10]
                top[np.argsort(-s[top])]
                base.append(time.perf_counter() - t)
            ratio = median(ours) / median(base)
            line += f"; numpy in memory p50 {1e3 * median(base):6.1f} ms -> {ratio:.2f}x (target <= 3x: {verdict(ratio <= 3)})"
            del M
        else:
            line += f" (target p50 <= 200 ms: {verdict(median(ours) <= 0.2)}; first <= 2 s: {verdict(first_s <= 2)})"
        print(line, flush=True)


def shapes_eval_memory(sizes: list[int]) -> None:
    """`clip-atlas shapes eval` needs a Shapes dataset: real scenes computed with the Shapes CLIP."""
    from compute.jobs.compute import ComputeConfig, run_compute
    from compute.shapes.dataset import generate
    print("\nPeak RSS of `clip-atlas shapes eval` (Shapes CLIP, last 4 layers x 8 heads, D 128):")
    peaks = {}
    for n in sizes:
        root = CACHE / f"shapes-{n}"
        if not (root / "run" / "manifest.json").is_file():
            generate(n, seed=901, out=root / "data", progress=False)
            run_compute(ComputeConfig("shapes", str(root / "data"), str(root / "run")), progress=False)
        t = time.time()
        peaks[n] = peak_rss_of([sys.executable, "-m", "compute.cli", "shapes", "eval", str(root / "run")]) / 2**30
        print(f"  shapes eval {n:>9,} images: peak {peaks[n]:5.2f} GiB, {time.time() - t:6.0f} s", flush=True)
    if len(sizes) >= 2:
        grow = peaks[sizes[-1]] - peaks[sizes[0]]
        print(f"  shapes eval {sizes[-1]:,} vs {sizes[0]:,}: +{grow:.2f} GiB (target < 1 GiB: {verdict(grow < 1.0)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--steps", default="textspan,label,metrics,index")
    ap.add_argument("--retrieval", default="100000,1000000")
    ap.add_argument("--shapes", default="10000,100000", help="Shapes stores for `shapes eval` ('' to skip)")
    a = ap.parse_args()
    if a.retrieval:
        retrieval([int(x) for x in a.retrieval.split(",")])
    if a.sizes:
        steps_memory([int(x) for x in a.sizes.split(",")], [s for s in a.steps.split(",") if s])
    if a.shapes:
        shapes_eval_memory([int(x) for x in a.shapes.split(",")])
    print(json.dumps({"cache": str(CACHE)}))


if __name__ == "__main__":
    main()
