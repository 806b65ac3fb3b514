"""Cost of the second-order effects of every neuron of one MLP layer, against a plain forward (`encode_image`).

    python benchmarks/neurons.py [--images 1000] [--batch 50] [--naive-neurons 48]

For each model (a random-init ViT-B-32 at layer 9, the paper's example, and the Shapes CLIP at its default
layer; `--models ViT-B-16-SigLIP:random --neurons 512` for an attention-pool tower, whose neurons keep D x D
moments, so a slice of the layer is timed), in one process:
  - plain: `encode_image` over the images, in batches;
  - factorised: what `clip-atlas neurons` does per batch: the forward that yields attention rows, LN scales and
    activations, the coefficients s for every neuron, their norms, the K x K moments and the running top-k;
  - naive: each neuron's write [tokens, width] carried through every later head one neuron at a time (what a
    direct per-neuron implementation does; the reference code does more, materialising every query token), timed
    on --naive-neurons neurons of a few images and extrapolated to the whole layer.
Also the one-off fold of G. Ratios are per image, against plain in the same process.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compute.jobs.neurons import _Slice  # noqa: E402
from compute.maths.neurons import SecondOrder, default_neuron_layers, trace  # noqa: E402
from compute.models import load_model  # noqa: E402


def naive_effects(so: SecondOrder, x: torch.Tensor, neurons: range) -> torch.Tensor:
    """[B, len(neurons), D]: per neuron, its write at every token through each later head, nothing factorised."""
    dec, fd = so.dec, so.dec.fold_dtype
    b = so(x)                         # the forward's attention rows, LN scales and activations
    hd = dec.head_dim
    U = so.writes()
    out = []
    for n in neurons:
        write = b.act[:, :, n, None] * U[n]                                      # [B, N, W]
        centred = write - write.mean(-1, keepdim=True)
        total = 0
        for k, (l, h) in enumerate(so.heads):
            lin = centred * dec.tower.ln1(l).weight.to(fd)                       # / sigma is inside token_weights
            v = lin @ dec.tower.value_weight(l)[h * hd:(h + 1) * hd].to(fd).T    # [B, N, hd]
            pooled = torch.einsum("bi,bik->bk", b.token_weights[:, k], v)
            total = total + pooled @ dec.M[l][h]
        out.append(total)
    return torch.stack(out, 1)


def bench(spec: str, layer: int | None, n_images: int, batch: int, naive_neurons: int, neurons: int | None) -> None:
    loaded = load_model(spec)
    info = loaded.info
    layer = default_neuron_layers(info.layers)[-1] if layer is None else layer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, *info.image_size, generator=g)
    n_batches = max(1, n_images // batch)
    t = time.perf_counter()
    total = loaded.decomposer().tower.mlp_out_weight(layer).shape[1]
    state = _Slice(layer, slice(0, min(neurons or total, total)))
    state.start(loaded.model, 8, loaded.decomposer())
    fold = time.perf_counter() - t
    ids = torch.arange(batch)

    def plain():
        with torch.no_grad():
            loaded.model.encode_image(x)

    def factorised():
        state.add(trace(state.so.dec, x, (layer,)), ids)

    plain(), factorised()                                                        # warm up
    t_plain = t_fact = 0.0
    for _ in range(n_batches):                                                   # alternate, so drift hits both
        t = time.perf_counter()
        plain()
        t_plain += time.perf_counter() - t
        t = time.perf_counter()
        factorised()
        t_fact += time.perf_counter() - t
    so = state.so
    per_plain = t_plain / (n_batches * batch)
    per_fact = t_fact / (n_batches * batch)
    kind = "K x K moments" if so.simple else f"effects formed, D x D moments, {so.channels} pool heads"
    print(f"\n{spec}, MLP layer {layer}: {so.n} of {total} neurons, {len(so.heads)} later heads ({kind}), "
          f"{n_batches * batch} images (batch {batch})")
    print(f"  plain forward            {1e3 * per_plain:8.2f} ms/image")
    print(f"  factorised, {so.n:5d} neurons {1e3 * per_fact:8.2f} ms/image  = {per_fact / per_plain:5.2f}x the forward")
    if so.simple:                     # the naive reference below reads one channel without per-image steps
        xs = x[:2]
        t = time.perf_counter()
        with torch.no_grad():
            naive = naive_effects(so, xs, range(naive_neurons))
        t_naive = (time.perf_counter() - t) * so.n / naive_neurons / len(xs)
        with torch.no_grad():
            exact = so.effects(so(xs).s)[:, :naive_neurons]
        err = float((naive - exact).abs().max() / exact.abs().max())
        print(f"  naive per-neuron path    {1e3 * t_naive:8.1f} ms/image  = {t_naive / per_plain:5.1f}x the forward "
              f"(extrapolated from {naive_neurons} neurons; agrees with the factorised form to {err:.1e})")
    t = time.perf_counter()
    state.finish(torch.nn.functional.normalize(torch.randn(64, info.embed_dim), dim=-1).numpy(), 5)
    print(f"  directions and texts     {time.perf_counter() - t:8.2f} s for the {so.n} neurons, once per job")
    print(f"  one-off fold of G        {fold:8.2f} s  ({so.G.numel() * so.G.element_size() / 2**20:.0f} MiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--naive-neurons", type=int, default=48)
    ap.add_argument("--models", default="ViT-B-32:random,shapes")
    ap.add_argument("--neurons", type=int, default=None, help="time the first N neurons of the layer (default all)")
    a = ap.parse_args()
    torch.manual_seed(0)
    for spec in a.models.split(","):
        bench(spec, 9 if spec.startswith("ViT-B-32") else None, a.images, a.batch, a.naive_neurons, a.neurons)


if __name__ == "__main__":
    main()
