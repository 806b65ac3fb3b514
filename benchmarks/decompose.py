"""Decomposition throughput against plain encode_image, token-map cost, and peak memory of `clip-atlas compute`.

    python benchmarks/decompose.py [--batch 16] [--rss-images 2000]

Ratios are measured in one process, alternating the two paths, on random-init models.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, peak_rss_of, timeit, verdict  # noqa: E402
from compute.maths.decompose import Decomposer, resolve_layers  # noqa: E402
from compute.models import load_model  # noqa: E402


def throughput(spec: str, batch: int, repeat: int) -> None:
    loaded = load_model(spec)
    model, info = loaded.model, loaded.info
    x = torch.randn(batch, 3, *info.image_size)
    store_path = Decomposer(model, head_layers=resolve_layers("last4", info.layers))
    maps_path = Decomposer(model, token_layers=list(range(info.layers)))

    def plain():
        with torch.no_grad():
            model.encode_image(x)

    def decompose():
        d = store_path(x)
        d.components().float().cpu().numpy()
        d.heads.numpy()

    def maps():
        maps_path(x)

    t_plain, t_dec, t_maps = [], [], []
    for _ in range(repeat):          # interleave so that machine noise hits all three alike
        t_plain += timeit(plain, 1, 0)
        t_dec += timeit(decompose, 1, 0)
        t_maps += timeit(maps, 1, 0)
    ratio = median(t_plain) / median(t_dec)
    cost = median(t_maps) / median(t_plain)
    print(f"{spec:18s} batch {batch}: encode_image {batch / median(t_plain):7.1f} img/s | "
          f"decomposition (heads last4 + components) {batch / median(t_dec):7.1f} img/s -> {ratio:.2f}x "
          f"(target >= 0.85x: {verdict(ratio >= 0.85)})")
    print(f"{'':18s} token maps, all layers: {cost:.2f}x a plain forward (target <= 1.5x: {verdict(cost <= 1.5)})")


def peak_rss(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "run"
        subprocess.run([sys.executable, "-m", "compute.cli", "shapes", "generate", "--n", str(n), "--out", str(data)],
                       check=True, capture_output=True)
        rss = peak_rss_of([sys.executable, "-m", "compute.cli", "compute", "--model", "ViT-B-32:random",
                           "--images", str(data), "--out", str(out)])
        print(f"peak RSS of `clip-atlas compute` on {n} images (ViT-B-32, last4 heads): {rss / 2**30:.2f} GiB "
              f"(target <= 2 GB: {verdict(rss / 2**30 <= 2)})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rss-images", type=int, default=2000)
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for spec in ("ViT-B-32:random", "ViT-B-16:random"):
        throughput(spec, a.batch, a.repeat)
    if a.rss_images:
        peak_rss(a.rss_images)
