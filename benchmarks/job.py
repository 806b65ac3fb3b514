"""`clip-atlas compute` end to end against its decomposition alone, and the store writer's rate.

    python benchmarks/job.py [--models shapes,shapes-siglip] [--images 6000] [--repeat 2]

Part 1, the job: the same Shapes images, decoded the same way, through (a) the decomposition alone (decode,
decompose, copy to the host: what `compute` does before it stores anything) and (b) the whole job into a fresh
store, alternating. The ratio (b)/(a) in images per second says how much of the decomposition's rate survives the
store. A GPU decomposes far faster than these CPUs, so the small Shapes models (hundreds of images a second here)
are the case to watch; 6,000 of their images make about three of the job's 64 MB chunks (the last chunk of a run is
written after its last batch, with nothing left to overlap).

Part 2, the writer: one chunk of a ViT-B-16-shaped run (48 heads, D 512) written with the store's Parquet settings
against the earlier settings (a dictionary and statistics on every column), its part files one by one and several at
once, in MB of float32 contributions per second.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, verdict  # noqa: E402
from compute.images import find_images  # noqa: E402
from compute.jobs.compute import ComputeConfig, run_compute  # noqa: E402
from compute.maths.decompose import Decomposer, component_layout, resolve_layers  # noqa: E402
from compute.models import load_model  # noqa: E402
from compute.runtime import decoded_batches, default_workers  # noqa: E402
from compute.store import layout  # noqa: E402
from compute.store.layout import Chunk, RunStore  # noqa: E402
from compute.store.readers import read_head  # noqa: E402


def job_ratio(spec: str, images: Path, repeat: int, batch: int = 32) -> None:
    loaded = load_model(spec, "cpu")
    loaded.drop_text_tower()
    info = loaded.info
    refs = find_images(images, None, None)
    dec = Decomposer(loaded.model, head_layers=resolve_layers("last4", info.layers))
    workers = default_workers()

    def alone():
        for _, pixels, _ in decoded_batches(refs, images, loaded.preprocess, batch, workers, max(info.image_size) * 2):
            d = dec(pixels)
            d.embedding.float().cpu().numpy()
            d.components().float().cpu().numpy()
            d.heads.float().cpu().numpy()

    def job():
        with tempfile.TemporaryDirectory() as tmp:
            run_compute(ComputeConfig(model=spec, images=str(images), out=str(Path(tmp) / "run"), batch_size=batch),
                        loaded=loaded, progress=False)

    t_alone, t_job = [], []
    alone()                          # warm up: first-call costs, the page cache
    for _ in range(repeat):
        for fn, ts in ((alone, t_alone), (job, t_job)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    n = len(refs)
    ratio = median(t_alone) / median(t_job)
    print(f"{spec:22s} {n} images, batch {batch}: decomposition alone {n / median(t_alone):6.1f} img/s | the job "
          f"{n / median(t_job):6.1f} img/s -> {ratio:.2f}x (target >= 0.9x: {verdict(ratio >= 0.9)})", flush=True)


def writer_rates(images: int = 1000) -> None:
    D, L, heads, head_layers = 512, 12, 12, [8, 9, 10, 11]
    rng = np.random.default_rng(0)
    kinds, layers = component_layout(L)
    ch = Chunk()
    ch.image_ids = list(range(1, images + 1))
    ch.paths = [f"{i:07d}.png" for i in ch.image_ids]
    ch.labels = [None] * images
    ch.embeddings = [rng.standard_normal((images, D)).astype(np.float32)]
    ch.components = [(rng.standard_normal((images, len(kinds), D)).astype(np.float32) * 0.01, kinds, layers)]
    ch.heads = [rng.standard_normal((images, len(head_layers), heads, D)).astype(np.float32) * 0.01]
    mb = 4 * D * images * (1 + len(kinds) + len(head_layers) * heads) / 1e6
    earlier = layout.write_table_atomic

    def every_column(table, path):           # the settings before: zstd, dictionary and statistics everywhere
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)

    threads = min(8, default_workers())
    with ThreadPoolExecutor(threads) as pool:
        cases = {"earlier settings, one by one": (every_column, None), "store settings, one by one": (earlier, None),
                 f"store settings, {threads} at once": (earlier, pool)}
        times: dict[str, list[float]] = {k: [] for k in cases}
        reads: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(3):
            for name, (write, parts) in cases.items():
                with tempfile.TemporaryDirectory() as tmp:
                    layout.write_table_atomic = write
                    try:
                        t = time.perf_counter()
                        RunStore(tmp).write_chunk(ch, head_layers, rank=0, parts=parts)
                        times[name].append(time.perf_counter() - t)
                    finally:
                        layout.write_table_atomic = earlier
                    t = time.perf_counter()       # what textspan, metrics and the index read: every head, whole
                    for layer in head_layers:
                        for h in range(heads):
                            read_head(RunStore(tmp), layer, h)
                    reads[name].append(time.perf_counter() - t)
    base, base_read = median(times["earlier settings, one by one"]), median(reads["earlier settings, one by one"])
    head_mb = 4 * D * images * len(head_layers) * heads / 1e6
    for name, ts in times.items():
        print(f"writer, {name:32s}: {mb / median(ts):6.0f} MB/s ({base / median(ts):.2f}x the earlier writer); "
              f"reading every head back {head_mb / median(reads[name]):6.0f} MB/s ({base_read / median(reads[name]):.2f}x)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="shapes,shapes-siglip")
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, "-m", "compute.cli", "shapes", "generate", "--n", str(a.images), "--out",
                        str(data)], check=True, capture_output=True)
        for spec in a.models.split(","):
            job_ratio(spec, data / "images", a.repeat)
        shutil.rmtree(data, ignore_errors=True)
    writer_rates()
