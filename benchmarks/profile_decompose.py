"""Where the decomposition's time goes, by operator, beside a plain forward (torch.profiler; GPU or CPU).

    python benchmarks/profile_decompose.py [--model EVA02-B-16:random] [--device cuda] [--precision bf16] [--batch 64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compute.maths.decompose import Decomposer, resolve_layers  # noqa: E402
from compute.models import load_model  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="EVA02-B-16:random")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    loaded = load_model(a.model, a.device)
    x = torch.randn(a.batch, 3, *loaded.info.image_size, device=a.device)
    dec = Decomposer(loaded.model, head_layers=resolve_layers("last4", loaded.info.layers))
    cast = torch.autocast("cuda", dtype=torch.bfloat16) if a.precision == "bf16" else torch.autocast("cpu", enabled=False)
    cuda = a.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "cuda_time_total" if cuda else "cpu_time_total"
    for name, fn in (("plain forward", lambda: loaded.model.encode_image(x)), ("decomposition", lambda: dec(x))):
        with torch.no_grad(), cast:
            for _ in range(3):
                fn()
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=acts) as prof:
                for _ in range(5):
                    fn()
                if cuda:
                    torch.cuda.synchronize()
        print(f"==== {a.model} {a.precision} batch {a.batch}: {name}")
        print(prof.key_averages().table(sort_by=key, row_limit=14))
