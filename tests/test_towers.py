"""The timm towers (SigLIP, SigLIP 2, EVA02, PE-Core) decompose exactly: against an independent float64 reference.

Each tower is built offline with random weights, cut to its first blocks (the blocks are all alike; the test stays
fast), cast to float64, and every bias, norm gain and the pool's latent query perturbed (random init sets biases to
0 and gains to 1, which hides mistakes). The reference below is written from the modules' weights alone, token by
token: it reads the forward's statistics (norm scales, attention probabilities, the pool's attention and MLP
gates) with its own hooks, then pushes each residual write through the readout with those statistics fixed.
"""
from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn as nn

from compute.maths.decompose import Decomposer
from compute.maths.saliency import baseline_maps, trace_attention
from compute.maths.towers import tower, unsupported_reason

FAMILIES = {"ViT-B-16-SigLIP": "map", "ViT-B-16-SigLIP2": "map", "EVA02-B-16": "tok", "PE-Core-B-16": "map"}
BLOCKS = 2


def small_tower(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    trunk = model.visual.trunk
    trunk.blocks = trunk.blocks[:BLOCKS]
    model = model.double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.visual.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.copy_(1 + 0.3 * torch.randn(mod.weight.shape, generator=g, dtype=torch.float64))
                mod.bias.copy_(0.2 * torch.randn(mod.bias.shape, generator=g, dtype=torch.float64))
            elif isinstance(mod, nn.Linear) and mod.bias is not None:
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g, dtype=torch.float64))
        for name, p in model.visual.named_parameters():
            if name.endswith(("q_bias", "v_bias", "latent")):
                p.copy_(p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def images(n: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-9) -> bool:
    """Equal to float64 round-off, relative to the reference's scale (random EVA heads write tiny vectors)."""
    return bool((a - b).abs().max() <= rel * b.abs().max() + 1e-15)


def centre(x):
    return x - x.mean(-1, keepdim=True)


def ln_lin(norm: nn.Module, x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
    """A LayerNorm's linear part with its scale `sig` fixed (Identity: x itself)."""
    return x if isinstance(norm, nn.Identity) else norm.weight * centre(x) / sig[..., None]


def ln_sig(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:-1], dtype=x.dtype) if isinstance(norm, nn.Identity) else \
        torch.sqrt(x.var(-1, unbiased=False) + norm.eps)


def linears(m: nn.Module) -> list[nn.Linear]:
    return [x for x in (m if isinstance(m, nn.Sequential) else [m]) if isinstance(x, nn.Linear)]


def reference(model: nn.Module, x: torch.Tensor) -> dict:
    """Per-head contributions [B, L, H, D], the last layer's per-source-token maps [B, H, N, D], the constant and
    the output, by brute force from the weights and the forward's statistics."""
    visual, trunk = model.visual, model.visual.trunk
    blocks = list(trunk.blocks)
    seen: dict = {}
    hooks = []
    for i, blk in enumerate(blocks):
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("p", i), o)))
        hooks.append(blk.attn.norm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("z", i), a[0])))
        hooks.append(blk.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("h", i), a[0])))
        hooks.append(blk.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("x", i), a[0])))
        hooks.append(blk.mlp.norm.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("hid", i), a[0])))
        hooks.append(blk.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("mlp", i), o)))
    hooks.append(trunk.norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0])))
    out = visual(x)
    for h in hooks:
        h.remove()
    B, N, W = seen["final"].shape
    H = blocks[0].attn.num_heads
    hd = W // H
    pool = trunk.attn_pool
    rows = slice(0, 1) if pool is None else slice(trunk.num_prefix_tokens if not hasattr(trunk, "rope") and not trunk.pool_include_prefix else 0, None)
    if pool is None and trunk.global_pool == "avg":
        rows = slice(trunk.num_prefix_tokens, None)
    r = seen["final"][:, rows]
    sig_f = ln_sig(trunk.norm, r)                                   # [B, n]
    tail = linears(trunk.head) + linears(visual.head)

    if pool is not None:
        y = trunk.norm(r)
        K, phd = pool.num_heads, pool.head_dim
        q = pool.q(pool.latent.expand(B, -1, -1)).view(B, K, phd)
        kv = pool.kv(y)
        k, v_full = kv[..., :W].view(B, -1, K, phd), kv[..., W:]
        a = torch.softmax(torch.einsum("bkd,btkd->bkt", q, k) * phd ** -0.5, -1)    # [B, K, n]
        o_true = pool.proj(torch.einsum("bkt,btkd->bkd", a, v_full.view(B, -1, K, phd)).reshape(B, W))
        sig_o = ln_sig(pool.norm, o_true)
        u = pool.mlp.fc1(pool.norm(o_true))
        gates = torch.where(u.abs() > 1e-12, pool.mlp.act(u) / u, torch.full_like(u, 0.5))
        after_pool = o_true + pool.mlp.fc2(pool.mlp.act(u))
        sig_fc = ln_sig(trunk.fc_norm, after_pool)
        wv = pool.kv.weight[W:]

        def lin(w):                                                 # w [B, n, W] -> [B, D], no bias anywhere
            yl = ln_lin(trunk.norm, w, sig_f)
            z = torch.einsum("bkt,btkd->bkd", a, (yl @ wv.T).view(B, -1, K, phd)).reshape(B, W)
            o = z @ pool.proj.weight.T
            o = o + ((ln_lin(pool.norm, o, sig_o) @ pool.mlp.fc1.weight.T) * gates) @ pool.mlp.fc2.weight.T
            o = ln_lin(trunk.fc_norm, o, sig_fc)
            for m in tail:
                o = o @ m.weight.T
            return o

        # the constant: a residual stream of zeros through the same frozen affine path, biases on
        y0 = trunk.norm.bias.expand(B, -1) if isinstance(trunk.norm, nn.LayerNorm) else torch.zeros(B, W, dtype=x.dtype)
        o0 = pool.proj(y0 @ wv.T + pool.kv.bias[W:])
        n0 = ln_lin(pool.norm, o0, sig_o) + (pool.norm.bias if isinstance(pool.norm, nn.LayerNorm) else 0)
        c = o0 + (gates * (n0 @ pool.mlp.fc1.weight.T + pool.mlp.fc1.bias)) @ pool.mlp.fc2.weight.T + pool.mlp.fc2.bias
        if isinstance(trunk.fc_norm, nn.LayerNorm):
            c = ln_lin(trunk.fc_norm, c, sig_fc) + trunk.fc_norm.bias
    else:
        def lin(w):
            o = ln_lin(trunk.norm, w, sig_f).mean(1)
            for m in tail:
                o = o @ m.weight.T
            return o

        c = trunk.norm.bias.expand(B, -1) if isinstance(trunk.norm, nn.LayerNorm) else torch.zeros(B, W, dtype=x.dtype)
    for m in tail:
        c = c @ m.weight.T + (m.bias if m.bias is not None else 0)

    heads, last_tokens = [], None
    for i, blk in enumerate(blocks):
        attn = blk.attn
        z = seen[("z", i)]                                          # [B, N, W] concatenated head outputs
        ls = getattr(blk, "gamma_1", None) if hasattr(blk, "gamma_1") else getattr(blk.ls1, "gamma", None)
        sig_s = ln_sig(attn.norm, z)
        per = []
        for h in range(H):
            zh = torch.zeros_like(z)
            zh[..., h * hd:(h + 1) * hd] = z[..., h * hd:(h + 1) * hd]
            write = ln_lin(attn.norm, zh, sig_s) @ attn.proj.weight.T
            write = write * ls if ls is not None else write
            per.append(lin(write[:, rows]))
        heads.append(torch.stack(per, 1))
        if i == len(blocks) - 1:                                    # per source token, one layer
            p = seen[("p", i)]                                      # [B, H, N, N]
            qkv_w = attn.qkv.weight if getattr(attn, "qkv", None) is not None else None
            if qkv_w is not None:
                wv_a = qkv_w[2 * W:]
                bv = attn.v_bias if getattr(attn, "v_bias", None) is not None else (attn.qkv.bias[2 * W:] if attn.qkv.bias is not None else 0)
            else:
                wv_a, bv = attn.v_proj.weight, attn.v_proj.bias
            v = (seen[("h", i)] @ wv_a.T + bv).view(B, N, H, hd)
            tok = {}                                                # a few (head, source token) pairs: brute force is slow
            for h in (0, H - 1):
                for m_ in (0, 1, N // 2, N - 1):
                    contrib = p[:, h, :, m_, None] * v[:, None, m_, h]             # [B, N(query t), hd]
                    zh = torch.zeros(B, N, W, dtype=x.dtype)
                    zh[..., h * hd:(h + 1) * hd] = contrib
                    write = ln_lin(attn.norm, zh, sig_s) @ attn.proj.weight.T
                    write = write * ls if ls is not None else write
                    tok[(h, m_)] = lin(write[:, rows])
            last_tokens = tok
    # `lin` reads a residual term at the read rows [B, n, W] into the embedding with every statistic frozen, no
    # bias; `seen` keeps the forward's block inputs, attention probabilities, MLP hidden values and outputs
    return {"heads": torch.stack(heads, 1), "tokens": last_tokens, "const": c, "out": out, "lin": lin, "rows": rows,
            "seen": seen}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model = small_tower(request.param)
    return request.param, model, reference(model, images())


def test_timm_towers_are_decomposable(family):
    name, model, _ = family
    assert unsupported_reason(model) is None
    t = tower(model)
    assert t.pool_type == FAMILIES[name] and t.n_layers == BLOCKS


def test_contributions_sum_to_the_embedding_and_match_the_reference(family):
    name, model, ref = family
    x = images()
    dec = Decomposer(model, head_layers=range(BLOCKS), token_layers=[BLOCKS - 1])
    d = dec(x)
    out = ref["out"]
    norm = out.norm(dim=-1, keepdim=True)
    assert torch.allclose(d.embedding, out / norm, atol=1e-12), name
    assert torch.allclose(d.total(), d.embedding, atol=1e-12), name
    assert close(d.heads * norm[:, None, None], ref["heads"]), name
    assert close(d.ln_bias * norm, ref["const"]), name
    # the constant computed directly is the embedding less every contribution
    others = d.embed + d.attn.sum(1) + d.attn_bias.sum(1) + d.mlp.sum(1)
    assert close((d.embedding - others) * norm, ref["const"])
    tokens = d.tokens[:, 0]                                         # [B, H, N, D]
    for (h, m), want in ref["tokens"].items():
        assert close(tokens[:, h, m] * norm, want), (name, h, m)
    assert close(tokens.sum(2), d.heads[:, -1])


def test_projected_token_maps_equal_the_wide_ones(family):
    name, model, _ = family
    x = images(1)
    dirs = torch.nn.functional.normalize(torch.randn(tower(model).embed_dim, 3, dtype=torch.float64), dim=0)
    dec = Decomposer(model, token_layers=[0, BLOCKS - 1])
    wide = dec(x).tokens
    assert close(dec(x, token_directions=dirs).tokens, wide @ dirs), name


def test_pool_mlp_share_is_reported_for_attention_pools(family):
    name, model, _ = family
    d = Decomposer(model)(images(1))
    if FAMILIES[name] == "map":
        assert d.pool_mlp is not None and torch.isfinite(d.pool_mlp).all() and d.pool_mlp.abs().sum() > 0
    else:
        assert d.pool_mlp is None


def test_saliency_baselines_read_the_readouts_query(family):
    """Class token towers read its row; attention-pool towers the pool's row (the attention map is the pool's
    mean row over the patches, rollout's query row is a distribution over tokens)."""
    name, model, _ = family
    t = tower(model)
    x = images(1)
    traced = trace_attention(t, x)
    assert close(traced.embedding, model.visual(x))
    texts = torch.nn.functional.normalize(torch.randn(1, t.embed_dim, dtype=torch.float64), dim=-1)
    maps = baseline_maps(t, x, texts)
    for m, grid in maps.items():
        assert grid.shape == (1, *t.grid) and torch.isfinite(grid).all(), (name, m)
    assert (maps["gradcam"] >= 0).all() and (maps["chefer"] >= 0).all()
    roll = maps["rollout"].sum()
    assert 0 < roll <= 1 + 1e-9
    if FAMILIES[name] == "map":
        assert traced.pool is not None
        assert close(maps["attention"].flatten(), traced.pool.mean(1)[0, t.prefix:])


def test_an_attention_pool_with_query_and_key_norms_sums_to_its_output():
    """The readout folds the pool's query through W_K when keys are not normalised; with a k_norm it computes the
    keys per token. Both must give the tower's own output."""
    model = small_tower("ViT-B-16-SigLIP")
    pool = model.visual.trunk.attn_pool
    g = torch.Generator().manual_seed(5)
    for name in ("q_norm", "k_norm"):
        norm = nn.LayerNorm(pool.head_dim).double()
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(pool.head_dim, generator=g, dtype=torch.float64))
            norm.bias.copy_(0.2 * torch.randn(pool.head_dim, generator=g, dtype=torch.float64))
        setattr(pool, name, norm)
    x = images()
    d = Decomposer(model, head_layers=range(BLOCKS))(x)
    with torch.no_grad():
        out = model.encode_image(x)
    assert torch.allclose(d.embedding, nn.functional.normalize(out, dim=-1), atol=1e-12)
    assert torch.allclose(d.total(), d.embedding, atol=1e-12)
