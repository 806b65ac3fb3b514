"""Second-order neuron effects on the timm towers (SigLIP, SigLIP 2 and PE-Core with attention-pool readouts, EVA02
with SwiGLU MLPs normalised inside, sub-LN and rotary embeddings): exact against a plain float64 reference.

The reference (test_towers.reference) reads the forward's statistics with its own hooks and carries a residual
write through one later head at a time, token by token, from the modules' weights: the block's norm1 with its
sigma frozen, the head's value rows, the forward's attention probabilities, the head's slice of the attention
output (through EVA's sub-LN with its sigma frozen), W_O, LayerScale, then the frozen readout (for attention
pools: the pool's attention, its MLP's gates). A neuron's write is built from the MLP's own hidden vector with
every other neuron zeroed, through the MLP's inner norm (sigma frozen) and fc2. It shares no code with
compute/maths/neurons.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compute.maths.neurons import (SecondOrder, dense_directions, head_shares, neuron_unsupported_reason,
                                   top_eigen)
from compute.maths.towers import tower

from .test_towers import BLOCKS, FAMILIES, close, images, ln_lin, ln_sig, reference, small_tower

LAYER = 0                                   # the first block's neurons; block 1 is the later attention


def _ls(blk, which):
    if hasattr(blk, f"gamma_{which}"):
        return getattr(blk, f"gamma_{which}")
    return getattr(getattr(blk, f"ls{which}"), "gamma", None)


def head_path(model, ref, layer, head, c):
    """The share of the embedding (times ||out||) that residual term c [B, N, W] reaches through one later head."""
    blk = model.visual.trunk.blocks[layer]
    seen, attn = ref["seen"], blk.attn
    W = c.shape[-1]
    H = attn.num_heads
    hd = W // H
    x = seen[("x", layer)]
    lin1 = ln_lin(blk.norm1, c, ln_sig(blk.norm1, x))
    wv = attn.qkv.weight[2 * W:] if getattr(attn, "qkv", None) is not None else attn.v_proj.weight
    rows = slice(head * hd, (head + 1) * hd)
    mixed = seen[("p", layer)][:, head] @ (lin1 @ wv[rows].T)                      # [B, N, hd]
    zh = torch.zeros_like(c)
    zh[..., rows] = mixed
    write = ln_lin(attn.norm, zh, ln_sig(attn.norm, seen[("z", layer)])) @ attn.proj.weight.T
    ls = _ls(blk, 1)
    write = write * ls if ls is not None else write
    return ref["lin"](write[:, ref["rows"]])


def later_path(model, ref, c):
    H = model.visual.trunk.blocks[0].attn.num_heads
    return sum(head_path(model, ref, l, h, c) for l in range(LAYER + 1, BLOCKS) for h in range(H))


def neuron_write(model, ref, n):
    """[B, N, W]: what neuron n alone writes, from the MLP's hidden vector with the others zeroed."""
    blk = model.visual.trunk.blocks[LAYER]
    mlp, hid = blk.mlp, ref["seen"][("hid", LAYER)]
    one = torch.zeros_like(hid)
    one[..., n] = hid[..., n]
    write = ln_lin(mlp.norm, one, ln_sig(mlp.norm, hid)) @ mlp.fc2.weight.T
    ls = _ls(blk, 2)
    return write * ls if ls is not None else write


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model = small_tower(request.param)
    x = images()
    return request.param, model, x, reference(model, x)


def test_every_family_has_neuron_effects(family):
    name, model, _, _ = family
    assert neuron_unsupported_reason(model) is None, name


def test_neuron_effects_sum_to_the_mlp_output_path(family):
    """The neurons' effects of a layer plus the bias write's equal the later-head path of the MLP's whole output
    (the forward's own tensor); one neuron's effect equals the path of its own write; per token they sum back; the
    direct effect is the readout of the neuron's write at the read rows."""
    name, model, x, ref = family
    blk = model.visual.trunk.blocks[LAYER]
    mlp, norm = blk.mlp, ref["out"].norm(dim=-1, keepdim=True)
    ls = _ls(blk, 2)
    with torch.no_grad():
        so = SecondOrder(model, LAYER)
        batch = so(x)
        eff = so.effects(batch.s, readout=batch.readout) * norm[:, None]           # [B, n, D]
        whole = ref["seen"][("mlp", LAYER)]
        whole = whole * ls if ls is not None else whole
        bias = mlp.fc2.bias + (mlp.norm.bias @ mlp.fc2.weight.T if isinstance(mlp.norm, nn.LayerNorm) else 0)
        bias = (bias * ls if ls is not None else bias).expand_as(whole)
        want = later_path(model, ref, whole)
        assert want.abs().max() > 1e-8, name                                        # not trivially zero
        assert close(eff.sum(1) + later_path(model, ref, bias), want), name
        for n in (0, 5, so.n - 1):
            one = later_path(model, ref, neuron_write(model, ref, n))
            assert close(eff[:, n], one), (name, n)
            assert close(so.token_effects(batch, n).sum(1) * norm, eff[:, n]), (name, n)
            direct = ref["lin"](neuron_write(model, ref, n)[:, ref["rows"]]).norm(dim=-1)
            assert close(batch.direct[:, n] * norm[:, 0], direct), (name, n)


def test_directions_and_head_shares_from_running_moments(family):
    """The principal direction from running moments equals an SVD of the stacked effects (explicit D x D moments
    where the readout has per-image steps; K x K moments otherwise)."""
    name, model, _, _ = family
    x = images(5, seed=11)
    with torch.no_grad():
        so = SecondOrder(model, LAYER, neurons=slice(40, 46))
        b = so(x)
        eff = so.effects(b.s, readout=b.readout)                                    # [B, n, D]
        assert so.simple == (FAMILIES[name] == "tok"), name
        d = dense_directions(torch.einsum("bnd,bne->nde", eff, eff), eff.sum(0))
        for n in range(so.n):
            _, S, Vh = torch.linalg.svd(eff[:, n], full_matrices=False)
            assert abs(abs(float(Vh[0] @ d.direction[n])) - 1) < 1e-8, (name, n)
            assert abs(float(S[0] ** 2 / (S ** 2).sum()) - float(d.share[n])) < 1e-8, (name, n)
        share = head_shares(so.head_moments(b.s), so.head_grams())
        assert share.shape == (so.n, len(so.heads)) and torch.allclose(share.sum(-1), torch.ones(so.n, dtype=share.dtype))


def test_top_eigen_matches_a_full_decomposition():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(6, 30, 80, generator=g, dtype=torch.float64) * torch.linspace(2, 0.1, 30, dtype=torch.float64)[:, None]
    A = X.transpose(1, 2) @ X
    lam, vec = top_eigen(A, block=4)
    w, V = torch.linalg.eigh(A)
    assert torch.allclose(lam, w[:, -1], rtol=1e-10)
    assert torch.allclose((vec * V[..., -1]).sum(-1).abs(), torch.ones(6, dtype=torch.float64), atol=1e-9)
    # not converged within the iterations allowed: the full decomposition takes over, same answer
    lam1, vec1 = top_eigen(A, block=4, iters=1)
    assert torch.allclose(lam1, w[:, -1], rtol=1e-10)
    assert torch.allclose((vec1 * V[..., -1]).sum(-1).abs(), torch.ones(6, dtype=torch.float64), atol=1e-9)


def test_the_tower_says_which_neurons_it_has(family):
    name, model, _, _ = family
    t = tower(model)
    W = t.mlp_out_weight(LAYER)
    assert W.shape[0] == t.width and W.shape[1] == model.visual.trunk.blocks[LAYER].mlp.fc2.in_features
