"""Cost of each zero-shot segmentation method against a plain forward (`encode_image`), and the whole command.

    python benchmarks/segmentation.py [--batch 32] [--images 500]

Per-batch ratios are measured in one process, alternating the paths, on the Shapes CLIP and on a random-init
ViT-B-16 (the paper's smallest model; batch 8). Then `clip-atlas eval segmentation` with all five methods on
--images one-object Shapes scenes, wall clock against the 2-minute target.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import median, timeit, verdict  # noqa: E402
from compute.eval.segmentation import decomposition_maps  # noqa: E402
from compute.maths.saliency import baseline_maps  # noqa: E402
from compute.models import load_model  # noqa: E402


def per_method(spec: str, batch: int, repeat: int) -> None:
    loaded = load_model(spec)
    info = loaded.info
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *info.image_size, generator=g)
    texts = F.normalize(torch.randn(batch, info.embed_dim, generator=g), dim=-1)
    layers = list(range(info.layers))

    def plain():
        with torch.no_grad():
            loaded.model.encode_image(x)

    paths = {"decomposition": lambda: decomposition_maps(loaded, x, texts, layers),
             "attention + rollout (one traced pass)": lambda: baseline_maps(loaded.tower, x, texts, ("attention", "rollout")),
             "gradcam + chefer (forward + backward)": lambda: baseline_maps(loaded.tower, x, texts, ("gradcam", "chefer"))}
    base = median(timeit(plain, repeat))
    print(f"\n{spec}: batch {batch}, plain forward {1e3 * base / batch:.1f} ms/image")
    for name, fn in paths.items():
        t = median(timeit(fn, repeat))
        line = f"  {name:40s} {t / base:5.2f}x the forward"
        if name == "decomposition":
            line += f"  (target <= 1.5x: {verdict(t / base <= 1.5)})"
        print(line)


def whole_command(n: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        exe = [sys.executable, "-m", "compute.cli"]
        subprocess.run(exe + ["shapes", "generate", "--n", str(n), "--seed", "401", "--objects", "1", "--out", d],
                       check=True, capture_output=True)
        t = time.perf_counter()
        subprocess.run(exe + ["eval", "segmentation", "--model", "shapes", "--images", f"{d}/images", "--masks",
                              f"{d}/masks", "--labels", f"{d}/objects.csv", "--out", f"{d}/out.csv"],
                       check=True, capture_output=True)
        wall = time.perf_counter() - t
    print(f"\n`clip-atlas eval segmentation`, all five methods, {n} Shapes images: {wall:.0f} s "
          f"(target < 120 s: {verdict(wall < 120)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--images", type=int, default=500)
    a = ap.parse_args()
    torch.set_num_threads(2)
    per_method("shapes", a.batch, a.repeat)
    per_method("ViT-B-16:random", 8, 3)
    whole_command(a.images)


if __name__ == "__main__":
    main()
