"""Batched TextSpan against a plain per-head loop of the same algorithm (the reference's way).

    python benchmarks/textspan.py [--n 10000] [--k 3500] [--heads 48] [--loop-heads 4]

Shapes as for the last 4 layers of ViT-B-16 (48 heads, D = 512), N images, K texts, m = 20, rank 80.
The contributions are synthetic low-rank-plus-noise matrices and the texts random unit vectors:
the timing of either implementation does not depend on the values, and both must pick the same texts.
The loop baseline runs on --loop-heads heads; its per-head time is scaled to all heads.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import verdict  # noqa: E402
from compute.maths.textspan import textspan  # noqa: E402


def loop_textspan(C: torch.Tensor, T: torch.Tensor, m: int, rank: int) -> list[int]:
    """One head, exactly as the reference does it: SVD, then m rounds over the full N x K score matrix."""
    _, _, vh = torch.linalg.svd(C, full_matrices=False)
    vh = vh[:rank]
    T = T @ vh.T @ vh
    C0 = C - C.mean(0, keepdim=True)
    picks = []
    for _ in range(m):
        j = int((C0 @ T.T).std(0).argmax())
        t = T[j] / T[j].norm()
        C0 = C0 - torch.outer(C0 @ t, t)
        T = T - torch.outer(T @ t, t)
        picks.append(j)
    return picks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--k", type=int, default=3_500)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=48)
    ap.add_argument("--loop-heads", type=int, default=4)
    ap.add_argument("--m", type=int, default=20)
    ap.add_argument("--rank", type=int, default=80)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(a.heads, 64, a.d, generator=g)
    C = torch.randn(a.heads, a.n, 64, generator=g) @ basis * 0.05 + 0.01 * torch.randn(a.heads, a.n, a.d, generator=g)
    T = torch.nn.functional.normalize(torch.randn(a.k, a.d, generator=g), dim=-1)

    t = time.perf_counter()
    res = textspan(C, T, m=a.m, rank=a.rank, floor=0.0)   # no early stop: the loop below makes all m picks
    batched = time.perf_counter() - t

    t = time.perf_counter()
    loop_picks = [loop_textspan(C[h], T, a.m, a.rank) for h in range(a.loop_heads)]
    per_head = (time.perf_counter() - t) / a.loop_heads
    same = all(res.picks[h].tolist() == loop_picks[h] for h in range(a.loop_heads))
    ratio = per_head * a.heads / batched
    print(f"TextSpan, {a.heads} heads, N={a.n}, K={a.k}, D={a.d}, m={a.m}, rank={a.rank}")
    print(f"  batched: {batched:.2f} s for all heads ({batched / a.heads * 1000:.0f} ms/head)")
    print(f"  per-head loop: {per_head:.2f} s/head (measured on {a.loop_heads} heads) -> {per_head * a.heads:.1f} s for all")
    print(f"  identical picks on the looped heads: {same}")
    print(f"  speed-up {ratio:.1f}x (target >= 5x: {verdict(ratio >= 5 and same)})")


if __name__ == "__main__":
    main()
