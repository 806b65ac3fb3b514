"""Decomposition throughput against plain encode_image, token-map cost, and peak memory of `clip-atlas compute`.

    python benchmarks/decompose.py [--batch 16] [--rss-images 2000] [--models ViT-B-32:random,...]
                                   [--device cpu|cuda] [--precision fp32|bf16]

Ratios are measured in one process, alternating the paths, on random-init models; every tower family by default
(open_clip ViT-B-32 and B-16, SigLIP, SigLIP 2, EVA02, PE-Core). The compute path is what `clip-atlas compute`
runs per batch: heads of the last 4 layers, every component, copied to the CPU.
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
from compute.maths.trace import RESID_FINAL  # noqa: E402
from compute.models import load_model  # noqa: E402


FAMILIES = ("ViT-B-32:random", "ViT-B-16:random", "ViT-B-16-SigLIP:random", "ViT-B-16-SigLIP2:random",
            "EVA02-B-16:random", "PE-Core-B-16:random")


def throughput(spec: str, batch: int, repeat: int, device: str = "cpu", precision: str = "fp32") -> None:
    loaded = load_model(spec, device)
    model, info = loaded.model, loaded.info
    x = torch.randn(batch, 3, *info.image_size, device=device)
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16" else torch.autocast("cpu", enabled=False)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    store_path = Decomposer(model, head_layers=resolve_layers("last4", info.layers))
    maps_path = Decomposer(model, token_layers=list(range(info.layers)))
    text = torch.nn.functional.normalize(torch.randn(info.embed_dim, 1, device=device), dim=0)

    def plain():
        with torch.no_grad(), cast:
            model.encode_image(x)
        sync()

    def decompose():
        with cast:
            d = store_path(x)
        d.components().float().cpu().numpy()
        d.heads.float().cpu().numpy()

    def maps():
        with cast:
            maps_path(x)
        sync()

    def text_maps():                 # what segmentation and the live pages need: maps along a text
        with cast:
            maps_path(x, token_directions=text)
        sync()

    with torch.no_grad(), cast:
        err = (store_path(x).embedding.float() - torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
        resid = store_path.tower.run(x, {RESID_FINAL})[RESID_FINAL]

    def readout():                   # the frozen readout alone (norm scales, a pool's weights and gates), fp32
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            store_path.tower.readout(resid)
        sync()
    t_plain, t_dec, t_maps, t_text, t_read = [], [], [], [], []
    for _ in range(repeat):          # interleave so that machine noise hits all of them alike
        t_plain += timeit(plain, 1, 0)
        t_read += timeit(readout, 1, 0)
        t_dec += timeit(decompose, 1, 0)
        t_maps += timeit(maps, 1, 0)
        t_text += timeit(text_maps, 1, 0)
    ratio = median(t_plain) / median(t_dec)
    cost = median(t_maps) / median(t_plain)
    text_cost = median(t_text) / median(t_plain)
    print(f"{spec:24s} {info.family:13s} {device} {precision} batch {batch}: encode_image {batch / median(t_plain):7.1f} img/s | "
          f"decomposition (heads last4 + components) {batch / median(t_dec):7.1f} img/s -> {ratio:.2f}x "
          f"(target >= 0.9x: {verdict(ratio >= 0.9)})")
    print(f"{'':24s} token maps, all layers, along a text: {text_cost:.2f}x a plain forward (target <= 1.5x: "
          f"{verdict(text_cost <= 1.5)}); D-wide: {cost:.2f}x; decomposition vs encode_image: max |diff| "
          f"{err.abs().max().item():.1e}")
    print(f"{'':24s} of which the frozen readout: {median(t_read) / median(t_plain):.3f} of a plain forward", flush=True)


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
    ap.add_argument("--models", default=",".join(FAMILIES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    for spec in a.models.split(","):
        throughput(spec, a.batch, a.repeat, a.device, a.precision)
    if a.rss_images:
        peak_rss(a.rss_images)
