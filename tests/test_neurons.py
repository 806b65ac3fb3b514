"""Second-order neuron effects: exact identities against a plain per-head re-computation from the forward's tensors.

The reference below runs the model's own modules (nn.MultiheadAttention with need_weights=True for the
attention pattern, the model's LayerNorms for sigma) and carries a residual write through one later head
at a time, token by token, in float64. It shares no code with compute/maths/neurons.py.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from compute.errors import AtlasError
from compute.maths.decompose import Decomposer
from compute.maths.neurons import (SecondOrder, default_neuron_layers, effect_norms, head_shares, nnls,
                                   principal_directions, sparse_texts)

from .conftest import random_model

TOL = 1e-10     # float64; the identities hold to round-off (measured 1e-15 to 1e-13)


def record(model, images):
    """Per block: the residual before it, the attention pattern [B, H, N, N], its attention and MLP writes."""
    v = model.visual
    x = v._embeds(images)
    rec = {"x": [], "probs": [], "attn": [], "mlp": [], "mid": []}
    for blk in v.transformer.resblocks:
        rec["x"].append(x)
        h = blk.ln_1(x)
        out, probs = blk.attn(h, h, h, need_weights=True, average_attn_weights=False)
        a = blk.ls_1(out)
        x = x + a
        rec["mid"].append(x)
        m = blk.ls_2(blk.mlp(blk.ln_2(x)))
        x = x + m
        rec["probs"].append(probs)
        rec["attn"].append(a)
        rec["mlp"].append(m)
    rec["final"] = x
    return rec


def readout(model, rec, c):
    """c [B, N, W], a term of the last residual -> its share of the L2-normalised embedding [B, D]."""
    v = model.visual
    ln = v.ln_post
    final = rec["final"]
    sigma = torch.sqrt(final.var(-1, unbiased=False, keepdim=True) + ln.eps)          # [B, N, 1]
    per_token = ((c - c.mean(-1, keepdim=True)) * ln.weight / sigma) @ v.proj
    assert not v.final_ln_after_pool
    pooled = per_token[:, 0] if v.pool_type == "tok" else per_token[:, 1:].mean(1)
    return pooled / rec["norm"]


def head_path(model, rec, layer, head, c, constant=False):
    """The share of the embedding that residual term c [B, N, W] reaches through head `head` of `layer`
    (linear part of ln_1, values without bias); `constant` reads c as already normalised (the ln_1 beta)."""
    blk = model.visual.transformer.resblocks[layer]
    W = c.shape[-1]
    H = blk.attn.num_heads
    hd = W // H
    rows = slice(head * hd, (head + 1) * hd)
    if constant:
        lin = c
    else:
        x = rec["x"][layer]
        sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + blk.ln_1.eps)
        lin = (c - c.mean(-1, keepdim=True)) * blk.ln_1.weight / sigma
    wv = blk.attn.in_proj_weight[2 * W:][rows]                                      # [hd, W]
    vals = lin @ wv.T                                                                  # [B, N, hd]
    mixed = rec["probs"][layer][:, head] @ vals                                        # [B, N(query), hd]
    out = mixed @ blk.attn.out_proj.weight[:, rows].T
    if hasattr(blk.ls_1, "gamma"):
        out = out * blk.ls_1.gamma
    return readout(model, rec, out)


def later_path(model, rec, write_layer, c):
    """Sum over every head of every layer after `write_layer`."""
    blocks = model.visual.transformer.resblocks
    H = blocks[0].attn.num_heads
    return sum(head_path(model, rec, l, h, c) for l in range(write_layer + 1, len(blocks)) for h in range(H))


def setup(name, seed=1, batch=2):
    model = random_model(name, torch.float64)
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        rec = record(model, images)
    rec["images"] = images
    rec["norm"] = model.encode_image(images).norm(dim=-1, keepdim=True).detach()
    return model, rec


@pytest.mark.parametrize("name", ["clip-atlas-shapes", "tiny-tok-ls", "tiny-avg-ls"])
def test_head_outputs_are_the_sum_of_every_earlier_write(name):
    """Identity (a): each head's actual pooled output (the head decomposition, from SDPA) equals the sum over the
    embedding and every earlier attention and MLP write of its linear path, plus ln_1's beta and the value bias."""
    model, rec = setup(name)
    blocks = model.visual.transformer.resblocks
    L, H = len(blocks), blocks[0].attn.num_heads
    with torch.no_grad():
        d = Decomposer(model, head_layers=range(L))(rec["images"])
        for layer in (1, L - 1):
            blk = blocks[layer]
            W = blk.attn.embed_dim
            writes = [rec["x"][0]] + [rec[k][j] for j in range(layer) for k in ("attn", "mlp")]
            beta = blk.ln_1.bias.expand_as(rec["x"][0])
            vbias = blk.attn.in_proj_bias[2 * W:]
            wv = blk.attn.in_proj_weight[2 * W:]
            for h in range(H):
                total = sum(head_path(model, rec, layer, h, c) for c in writes)
                # the value bias enters after W_V: express it as a pseudo-input solving wv @ y = b
                y = torch.linalg.lstsq(wv, vbias[:, None]).solution[:, 0]
                total = total + head_path(model, rec, layer, h, beta + y.expand_as(beta), constant=True)
                assert (total - d.heads[:, layer, h]).abs().max() < TOL


@pytest.mark.parametrize("name", ["clip-atlas-shapes", "tiny-tok-ls", "tiny-avg-ls"])
def test_neuron_effects_sum_to_the_mlp_output_path(name):
    """Identity (b): the neurons' effects of a layer plus the c_proj-bias write's effect equal the later-head path
    of that MLP's whole output taken from the forward's own tensor; and one neuron's effect equals the path of its
    own write act_n(i) u_n."""
    model, rec = setup(name)
    blocks = model.visual.transformer.resblocks
    layer = len(blocks) - 3
    blk = blocks[layer]
    with torch.no_grad():
        so = SecondOrder(model, layer)
        batch = so(rec["images"])
        eff = so.effects(batch.s)                                                     # [B, n, D]
        ls = blk.ls_2.gamma if hasattr(blk.ls_2, "gamma") else 1.0
        bias_write = (blk.mlp.c_proj.bias * ls).expand_as(rec["mlp"][layer])
        whole = later_path(model, rec, layer, rec["mlp"][layer])
        assert (eff.sum(1) + later_path(model, rec, layer, bias_write) - whole).abs().max() < TOL
        assert whole.abs().max() > 1e-6                                               # not trivially zero
        act = blk.mlp.gelu(blk.mlp.c_fc(blk.ln_2(rec["mid"][layer])))                 # [B, N, n]
        assert (batch.act - act).abs().max() < TOL
        u = so.writes()
        for n in (0, 7, so.n - 1):
            one = later_path(model, rec, layer, act[..., n:n + 1] * u[n])
            assert (eff[:, n] - one).abs().max() < TOL
            # split over tokens, the effect sums back
            assert (so.token_effects(batch, n).sum(1) - eff[:, n]).abs().max() < TOL
        # the direct (first-order) effect norm: the neuron's write at the pooled tokens through the readout
        direct = torch.stack([readout(model, rec, act[..., n:n + 1] * u[n]).norm(dim=-1) for n in range(so.n)], 1)
        assert (batch.direct - direct).abs().max() < TOL


def test_norms_and_directions_need_no_stacked_effects():
    model, rec = setup("clip-atlas-shapes", batch=6)
    with torch.no_grad():
        so = SecondOrder(model, 3, neurons=slice(10, 40))
        b = so(rec["images"])
        eff = so.effects(b.s)                                                          # [B, n, D]
        assert (effect_norms(b.s, so.grams()) - eff.norm(dim=-1)).abs().max() < TOL
        moments = torch.einsum("bkn,bjn->nkj", b.s, b.s)
        d = principal_directions(so.G, moments, b.s.sum(0).T)
        for n in range(so.n):
            E = eff[:, n]                                                              # [B, D]
            _, S, Vh = torch.linalg.svd(E, full_matrices=False)
            assert abs(abs(float(Vh[0] @ d.direction[n])) - 1) < 1e-9
            assert abs(float(S[0] ** 2 / (S ** 2).sum()) - float(d.share[n])) < 1e-9
            assert float(d.direction[n] @ E.sum(0)) >= 0                               # signed along the mean
        share = head_shares(so.head_moments(b.s), so.head_grams())
        assert torch.allclose(share.sum(-1), torch.ones(so.n, dtype=torch.float64))
        # one channel: a head's energy is its coefficient's second moment times its direction's squared norm
        energy = torch.diagonal(moments, dim1=1, dim2=2) * (so.G ** 2).sum(-1).T
        assert torch.allclose(share, energy / energy.sum(-1, keepdim=True))


def test_neuron_slices_match_the_whole_layer():
    model, rec = setup("clip-atlas-shapes")
    with torch.no_grad():
        whole = SecondOrder(model, 2)(rec["images"]).s
        part = SecondOrder(model, 2, neurons=slice(100, 164))(rec["images"]).s
    assert (whole[..., 100:164] - part).abs().max() < TOL


def test_layers_and_models_are_checked():
    model = random_model("clip-atlas-shapes")
    with pytest.raises(AtlasError, match="no later attention"):
        SecondOrder(model, 5)
    assert default_neuron_layers(12) == [8, 9, 10]
    assert default_neuron_layers(24) == list(range(16, 23))
    assert default_neuron_layers(6) == [4]
    assert default_neuron_layers(2) == [0]


def brute_nnls(A, b):
    """The NNLS optimum by enumeration: the best unconstrained fit over supports whose fit is positive."""
    best, best_x = float("inf"), torch.zeros(A.shape[1], dtype=A.dtype)
    for r in range(A.shape[1] + 1):
        for S in itertools.combinations(range(A.shape[1]), r):
            x = torch.zeros(A.shape[1], dtype=A.dtype)
            if S:
                sol = torch.linalg.lstsq(A[:, list(S)], b[:, None]).solution[:, 0]
                if (sol < 0).any():
                    continue
                x[list(S)] = sol
            err = float((A @ x - b).norm())
            if err < best - 1e-12:
                best, best_x = err, x
    return best_x


def test_nnls_matches_enumeration():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        A = torch.randn(12, 5, generator=g, dtype=torch.float64)
        b = torch.randn(12, generator=g, dtype=torch.float64)
        assert (nnls(A, b) - brute_nnls(A, b)).abs().max() < 1e-9


def test_sparse_texts_recovers_a_planted_combination():
    g = torch.Generator().manual_seed(2)
    texts = torch.nn.functional.normalize(torch.randn(50, 32, generator=g, dtype=torch.float64), dim=-1)
    target = torch.nn.functional.normalize(0.8 * texts[3] + 0.5 * texts[17] + 0.3 * texts[40], dim=0)
    idx, coef, explained = sparse_texts(torch.stack([target, texts[9]]), texts, k=5)
    assert set(idx[0].tolist()) - {-1} == {3, 17, 40}
    assert abs(float(explained[0]) - 1) < 1e-9
    assert (coef >= 0).all()
    assert idx[1, 0] == 9 and float(explained[1]) > 1 - 1e-9
