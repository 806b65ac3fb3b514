"""timm towers inside open_clip (`TimmModel`): timm's VisionTransformer (SigLIP, SigLIP 2) and Eva (EVA02, PE-Core).

The forward is the tower's own, run once with hooks on its modules (the block inputs, the attention's
probabilities after softmax, its concatenated head outputs before the attention's inner norm, the MLP's output),
so rotary embeddings, q/k norms and SwiGLU run exactly as timm wrote them. The readout after the last block is
recomputed from the final residual stream with its statistics frozen (trace.Readout):

- class token / average pooling: the final norm at the pooled row(s), then fc_norm, the head and open_clip's
  projection, each affine once its scale is fixed;
- attention pool (MAP): a latent query attends over the final-normed tokens with weights a[k, t]; with the final
  norm's sigma_t frozen, channel k reads r_t through a[k, t] / sigma_t, centring and gamma, then W_V,k and its
  slice of the pool's W_proj; the pool's residual MLP x + W2 act(W1 norm(x) + b1) + b2 is affine with its
  gates g = act(u) / u frozen (u the pre-activation, 0.5 where u = 0); biases, betas and the value bias
  (sum_t a[k, t] = 1) make the constant.

EVA's LayerNorm inside attention (sub-LN, before W_O): with its sigma frozen per token, centring over the
concatenated heads is linear, so head h's write is its slice of W_O diag(gamma) C applied to z_h, divided by
that token's sigma (hook_sub_scale); its beta goes to the layer's bias term.

MLP neurons (Mlp, SwiGLU, GluMlp): neuron n's activation is its hidden value h_n entering fc2 (SwiGLU: the gate
times the up-projection). Where the MLP normalises its hidden vector (EVA02's scale_mlp) the norm's sigma is
frozen per token like any other: the activation is h_n / sigma and the write per unit is
fc2.weight (gamma * (e_n - 1/M)), the centring shared out over the neurons; the norm's beta joins fc2's bias.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from open_clip.timm_model import TimmModel
from timm.layers import (Attention, AttentionPoolLatent, AttentionRope, GELUTanh, GluMlp, LayerScale, Mlp, QuickGELU,
                         SwiGLU)
from timm.models.eva import Eva, EvaAttention, EvaBlock
from timm.models.vision_transformer import Block, VisionTransformer

from compute.errors import AtlasError
from compute.maths import trace as tr
from compute.maths.trace import (ActivationCache, HeadWrite, Keep, LinearStep, Norm, NormStep, Readout, ReadMaps,
                                 ResidualMLPStep, Step, Tower)

_ATTENTIONS = (Attention, EvaAttention, AttentionRope)
_ELEMENTWISE = (nn.GELU, GELUTanh, QuickGELU, nn.SiLU, nn.ReLU, nn.Tanh)


def is_timm_tower(visual: nn.Module) -> bool:
    return isinstance(visual, TimmModel)


def _norm_ok(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.Identity))


def _linear_chain(m: nn.Module) -> list[nn.Linear] | None:
    """The Linear layers of a head made of Linear, Dropout and Identity only (in order), or None."""
    mods = list(m) if isinstance(m, nn.Sequential) else [m]
    if not all(isinstance(x, (nn.Linear, nn.Dropout, nn.Identity)) for x in mods):
        return None
    return [x for x in mods if isinstance(x, nn.Linear)]


def unsupported_reason(visual: nn.Module) -> str | None:
    """Why this timm tower cannot be traced and decomposed, or None."""
    trunk = visual.trunk
    if not isinstance(trunk, (VisionTransformer, Eva)):
        return (f"its timm trunk is a {type(trunk).__name__} (a ConvNeXt, FastViT/MobileCLIP or other non-ViT "
                "tower): its features are not a sum of token writes")
    for blk in trunk.blocks:
        if type(blk) not in (Block, EvaBlock):
            return f"its blocks are {type(blk).__name__} (post-norm or parallel), not pre-norm residual blocks"
        a = blk.attn
        if not isinstance(a, _ATTENTIONS):
            return f"its attention is {type(a).__name__}"
        if getattr(a, "gate", None) is not None:
            return "its attention has a sigmoid output gate"
        if getattr(a, "num_kv_groups", 1) != 1:
            return "its attention groups key/value heads"
        if not _norm_ok(a.norm):
            return f"the norm inside its attention is {type(a.norm).__name__}"
        if a.proj.in_features != trunk.embed_dim:
            return "its attention width differs from the residual width"
    if not (_norm_ok(trunk.norm) and _norm_ok(trunk.fc_norm)):
        return "its final norms are not LayerNorms"
    if _linear_chain(trunk.head) is None or _linear_chain(visual.head) is None:
        return "its projection head is not linear (an MLP projection or a custom pool)"
    pool = trunk.attn_pool
    if pool is not None:
        if not isinstance(pool, AttentionPoolLatent):
            return f"its pool is {type(pool).__name__}"
        if pool.latent_len != 1 or pool.pos_embed is not None or pool.pool != "token":
            return "its attention pool has several latent queries or its own position embedding"
        mlp = pool.mlp
        if mlp is None or not isinstance(mlp.act, _ELEMENTWISE) or not isinstance(mlp.norm, nn.Identity):
            return "its attention pool's MLP is not fc1 -> elementwise activation -> fc2"
        if not _norm_ok(pool.norm):
            return "its attention pool normalises with something other than a LayerNorm"
    elif trunk.global_pool not in ("token", "avg"):
        return f"global pool {trunk.global_pool!r} has no single embedding to decompose"
    elif trunk.global_pool == "token" and trunk.num_prefix_tokens < 1:
        return "token pooling without a class token"
    return None


def _mlp_reason(mlp: nn.Module) -> str | None:
    if not isinstance(mlp, (Mlp, SwiGLU, GluMlp)):
        return f"its MLP is {type(mlp).__name__}, not fc1 -> activation -> fc2"
    if not _norm_ok(mlp.norm):
        return f"its MLP normalises with {type(mlp.norm).__name__}"
    return None


def _ls(blk: nn.Module, which: int) -> torch.Tensor | None:
    """LayerScale gamma after attention (1) or the MLP (2), or None."""
    if isinstance(blk, EvaBlock):
        return getattr(blk, f"gamma_{which}")
    m = getattr(blk, f"ls{which}")
    return m.gamma if isinstance(m, LayerScale) else None


def _value_proj(a: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_V [W, W_in], its bias) of every head, stacked."""
    W = a.proj.in_features
    if getattr(a, "qkv", None) is not None:
        weight = a.qkv.weight[2 * W:3 * W]
        if getattr(a, "v_bias", None) is not None:
            return weight, a.v_bias
        return weight, None if a.qkv.bias is None else a.qkv.bias[2 * W:3 * W]
    return a.v_proj.weight, a.v_proj.bias


class TimmTower(Tower):
    def __init__(self, model: nn.Module):
        reason = unsupported_reason(model.visual)
        if reason:
            raise AtlasError(f"cannot decompose: {reason}")
        self.visual = model.visual
        self.trunk = t = model.visual.trunk
        self.family = "timm EVA" if isinstance(t, Eva) else "timm ViT"
        self.blocks = list(t.blocks)
        self.n_layers = len(self.blocks)
        self.n_heads = self.blocks[0].attn.num_heads
        self.width = t.embed_dim
        self.head_dim = self.width // self.n_heads
        self.prefix = t.num_prefix_tokens
        self.grid = tuple(t.patch_embed.grid_size)
        self.image_size = tuple(t.patch_embed.img_size)
        self.pool = t.attn_pool
        self.pool_type = "map" if self.pool is not None else ("tok" if t.global_pool == "token" else "avg")
        self.readout_post = self.pool is not None or not isinstance(t.fc_norm, nn.Identity)
        self.linears = _linear_chain(t.head) + _linear_chain(self.visual.head)
        p = next(self.visual.parameters())
        self.stats_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            probe = torch.zeros(1, 1, self.width, dtype=p.dtype, device=p.device)
            self.embed_dim = self._tail(probe[:, 0] if self.pool is None else self.pool(probe)).shape[-1]

    def _tail(self, pooled: torch.Tensor) -> torch.Tensor:
        y = self.trunk.fc_norm(pooled)
        for lin in self.linears:
            y = lin(y)
        return y

    # ---- weights
    def pooled(self) -> slice:
        if self.pool_type == "tok":
            return slice(0, 1)
        if self.pool_type == "avg" or not (isinstance(self.trunk, Eva) or self.trunk.pool_include_prefix):
            return slice(self.prefix, None)
        return slice(0, None)

    def _norm_matrix(self, norm: nn.Module) -> torch.Tensor:
        """[W, W]: a LayerNorm's linear part before 1/sigma (centring, then gamma), as r @ matrix."""
        fd, W = self.stats_dtype, self.width
        dev = next(self.visual.parameters()).device
        if isinstance(norm, nn.Identity):
            return torch.eye(W, dtype=fd, device=dev)
        gamma = norm.weight.to(fd) if norm.weight is not None else torch.ones(W, dtype=fd, device=dev)
        return torch.diag(gamma) - gamma[None, :] / W

    def head_write(self, layer: int) -> HeadWrite:
        blk, fd, W = self.blocks[layer], self.stats_dtype, self.width
        a = blk.attn
        wo = a.proj.weight.to(fd)                                   # [W_out, W_in]
        ls = _ls(blk, 1)
        ls = ls.to(fd) if ls is not None else torch.ones(W, dtype=fd, device=wo.device)
        bias = a.proj.bias.to(fd) if a.proj.bias is not None else torch.zeros(W, dtype=fd, device=wo.device)
        scaled = isinstance(a.norm, nn.LayerNorm)
        inner = self._norm_matrix(a.norm)                           # z @ inner: the sub-LN's linear part
        if scaled and a.norm.bias is not None:
            bias = bias + a.norm.bias.to(fd) @ wo.T
        matrix = (inner @ wo.T) * ls[None, :]                       # [W_in, W_out]
        return HeadWrite(matrix.view(self.n_heads, self.head_dim, W), bias * ls, scaled)

    def read_maps(self) -> ReadMaps:
        fd = self.stats_dtype
        A0 = self._norm_matrix(self.trunk.norm)                     # [W, W]
        if self.pool is None:
            A = A0
            if isinstance(self.trunk.fc_norm, nn.Identity):         # only static linears follow: fold them in
                for lin in self.linears:
                    A = A @ lin.weight.to(fd).T
            return ReadMaps(A[None], None)
        H, hd = self.pool.num_heads, self.pool.head_dim
        wv = self.pool.kv.weight[self.width:].to(fd).view(H, hd, self.width)     # [K, hd, W]
        A = torch.einsum("vw,khw->kvh", A0, wv)                     # [K, W, hd]
        wp = self.pool.proj.weight.to(fd).view(-1, H, hd)           # [Wp, K, hd]
        return ReadMaps(A, wp.permute(1, 2, 0).contiguous())        # B: [K, hd, Wp]

    # ---- neurons
    def neuron_unsupported_reason(self) -> str | None:
        for blk in self.blocks:
            reason = _mlp_reason(blk.mlp)
            if reason:
                return reason
        return None

    def ln1(self, layer: int) -> Norm:
        n = self.blocks[layer].norm1
        return Norm(n.weight, n.bias, n.eps)

    def value_weight(self, layer: int) -> torch.Tensor:
        return _value_proj(self.blocks[layer].attn)[0]

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        mlp = self.blocks[layer].mlp
        w = mlp.fc2.weight
        if isinstance(mlp.norm, nn.Identity):
            return w
        g = mlp.norm.weight if mlp.norm.weight is not None else torch.ones(w.shape[1], dtype=w.dtype, device=w.device)
        return w * g - (w @ g)[:, None] / w.shape[1]

    def mlp_scale(self, layer: int) -> torch.Tensor | None:
        return _ls(self.blocks[layer], 2)

    # ---- the readout, frozen
    def readout(self, x: torch.Tensor) -> Readout:
        fd, t = self.stats_dtype, self.trunk
        x = x.to(fd)
        B = x.shape[0]
        rows = x[:, self.pooled()]
        fnorm = t.norm
        eps = fnorm.eps if isinstance(fnorm, nn.LayerNorm) else 0.0
        inv = 1.0 / tr.sigma(rows, eps, fd) if isinstance(fnorm, nn.LayerNorm) else torch.ones(rows.shape[:2], dtype=fd, device=x.device)
        beta = fnorm.bias.to(fd) if isinstance(fnorm, nn.LayerNorm) and fnorm.bias is not None else torch.zeros(self.width, dtype=fd, device=x.device)
        steps: list[Step] = []
        a = pool_out = None
        if self.pool is None:
            n = rows.shape[1]
            weights = (inv / n)[:, None]                            # [B, 1, n]
            pooled_const = beta.expand(B, -1)
            if isinstance(t.fc_norm, nn.Identity):                  # static linears were folded into A
                for lin in self.linears:
                    pooled_const = pooled_const @ lin.weight.to(fd).T + (lin.bias.to(fd) if lin.bias is not None else 0)
                return Readout(weights, pooled_const)
            normed = fnorm(rows).mean(1)                            # the pooled vector fc_norm sees
            steps.append(self._norm_step(t.fc_norm, normed))
        else:
            pool = self.pool
            K, hd = pool.num_heads, pool.head_dim
            W = self.width
            y = fnorm(rows)                                         # [B, n, W] the tokens the pool attends over
            q = pool.q_norm(pool.q(pool.latent).view(K, hd)).to(fd)   # [K, hd], the same for every image
            wk, wv = pool.kv.weight[:W].to(fd), pool.kv.weight[W:].to(fd)
            kb, vb = ((pool.kv.bias[:W].to(fd), pool.kv.bias[W:].to(fd)) if pool.kv.bias is not None
                      else (torch.zeros(W, dtype=fd, device=x.device),) * 2)
            wp, bp = pool.proj.weight.to(fd), pool.proj.bias.to(fd)
            if isinstance(pool.k_norm, nn.Identity):
                # q . (W_K y + b_K) = (W_K^T q) . y + q . b_K: one W-vector per channel instead of keys per token
                qk = torch.einsum("kd,kdw->kw", q, wk.view(K, hd, W))
                s = qk @ y.transpose(1, 2) + (q * kb.view(K, hd)).sum(-1)[:, None]            # [B, K, n]
            else:
                k = pool.k_norm((y @ wk.T + kb).view(B, -1, K, hd).transpose(1, 2))       # [B, K, n, hd]
                s = (k @ q[..., None])[..., 0]
            a = torch.softmax(s * pool.scale, dim=-1)               # [B, K, n]
            weights = a * inv[:, None]
            # sum_t a[k, t] (W_V y_t + b_V) = W_V (a y)_k + b_V, since each row of a sums to 1
            v = torch.einsum("bkw,kdw->bkd", a @ y, wv.view(K, hd, W)) + vb.view(K, hd)
            o = v.reshape(B, -1) @ wp.T + bp
            pooled_const = ((beta @ wv.T + vb) @ wp.T + bp).expand(B, -1)
            mlp = pool.mlp
            norm = self._norm_step(pool.norm, o)
            u = (norm.lin(o[:, None]) + (norm.bias(B) if norm.bias(B) is not None else 0))[:, 0]
            u = u @ mlp.fc1.weight.to(fd).T + (mlp.fc1.bias.to(fd) if mlp.fc1.bias is not None else 0)
            act = mlp.act(u)
            live = u.abs() > 1e-12                                  # act(u) / u, and its limit 1/2 at u = 0
            gates = torch.where(live, act / torch.where(live, u, torch.ones_like(u)), torch.full_like(u, 0.5))
            steps.append(ResidualMLPStep(norm, mlp.fc1.weight.to(fd), None if mlp.fc1.bias is None else mlp.fc1.bias.to(fd),
                                         gates, mlp.fc2.weight.to(fd), None if mlp.fc2.bias is None else mlp.fc2.bias.to(fd)))
            pooled_out = o + ((u * gates) @ mlp.fc2.weight.to(fd).T + (mlp.fc2.bias.to(fd) if mlp.fc2.bias is not None else 0))
            if not isinstance(t.fc_norm, nn.Identity):
                steps.append(self._norm_step(t.fc_norm, pooled_out))
            pool_out = self._tail(pooled_out)
        steps += [LinearStep(lin.weight.to(fd), None if lin.bias is None else lin.bias.to(fd)) for lin in self.linears]
        return Readout(weights, pooled_const, steps, a, pool_out)

    def _norm_step(self, norm: nn.Module, y: torch.Tensor) -> NormStep:
        """A LayerNorm (or Identity) at pooled vectors y [B, d], its scale frozen."""
        fd = self.stats_dtype
        if isinstance(norm, nn.Identity):
            return NormStep(torch.ones(y.shape[-1], dtype=fd, device=y.device), None,
                            torch.ones(y.shape[0], dtype=fd, device=y.device), centred=False)
        gamma = norm.weight.to(fd) if norm.weight is not None else torch.ones(y.shape[-1], dtype=fd, device=y.device)
        return NormStep(gamma, None if norm.bias is None else norm.bias.to(fd), 1.0 / tr.sigma(y, norm.eps, fd))

    # ---- the forward
    def run(self, images: torch.Tensor, keep: Keep) -> ActivationCache:
        wanted = tr.wants(keep)
        cache = ActivationCache(self.pooled())
        sl = cache.pooled
        handles, fused = [], []
        H, hd, fd = self.n_heads, self.head_dim, self.stats_dtype

        def block_in(i):
            def hook(mod, args):
                x = args[0]
                if i == 0 and wanted(tr.EMBED):
                    cache[tr.EMBED] = x
                if wanted(tr.LN1_SCALE.format(i)):
                    cache[tr.LN1_SCALE.format(i)] = tr.sigma(x, mod.norm1.eps, fd)
            return hook

        def attn_in(i):
            def hook(mod, args):
                if wanted(tr.VALUES.format(i)):
                    h = args[0]
                    w, b = _value_proj(mod)
                    v = h @ w.T + (b if b is not None else 0)
                    cache[tr.VALUES.format(i)] = v.view(h.shape[0], h.shape[1], H, hd).transpose(1, 2)
            return hook

        def pattern(i):
            def hook(mod, args, out):
                if wanted(tr.PATTERN.format(i)):
                    cache[tr.PATTERN.format(i)] = out
                if wanted(tr.PATTERN_POOLED.format(i)):
                    cache[tr.PATTERN_POOLED.format(i)] = out[:, :, sl]
            return hook

        def z_in(i):
            def hook(mod, args):
                z = args[0][:, sl]                                  # [B, n, W]
                if wanted(tr.Z_POOLED.format(i)):
                    cache[tr.Z_POOLED.format(i)] = z.view(z.shape[0], z.shape[1], H, hd).transpose(1, 2)
                if isinstance(mod, nn.LayerNorm) and wanted(tr.SUB_SCALE.format(i)):
                    cache[tr.SUB_SCALE.format(i)] = 1.0 / tr.sigma(z, mod.eps, fd)
            return hook

        def mlp_out(i, blk):
            def hook(mod, args, out):
                if wanted(tr.MLP_OUT_POOLED.format(i)):
                    g = _ls(blk, 2)
                    cache[tr.MLP_OUT_POOLED.format(i)] = (out * g if g is not None else out)[:, sl]
            return hook

        def hidden(i):
            def hook(mod, args):
                if wanted(tr.MLP_POST.format(i)):
                    h = args[0]
                    if isinstance(mod, nn.LayerNorm):
                        h = h.to(fd) / tr.sigma(h, mod.eps, fd)[..., None]
                    cache[tr.MLP_POST.format(i)] = h
            return hook

        def final_in(mod, args):
            if wanted(tr.RESID_FINAL):
                cache[tr.RESID_FINAL] = args[0]

        try:
            for i, blk in enumerate(self.blocks):
                handles.append(blk.register_forward_pre_hook(block_in(i)))
                handles.append(blk.attn.register_forward_pre_hook(attn_in(i)))
                handles.append(blk.attn.norm.register_forward_pre_hook(z_in(i)))
                handles.append(blk.mlp.register_forward_hook(mlp_out(i, blk)))
                if isinstance(getattr(blk.mlp, "norm", None), nn.Module):
                    handles.append(blk.mlp.norm.register_forward_pre_hook(hidden(i)))
                if wanted(tr.PATTERN.format(i)) or wanted(tr.PATTERN_POOLED.format(i)):
                    fused.append((blk.attn, blk.attn.fused_attn))
                    blk.attn.fused_attn = False                     # the explicit path calls attn_drop(softmax)
                    handles.append(blk.attn.attn_drop.register_forward_hook(pattern(i)))
            handles.append(self.trunk.norm.register_forward_pre_hook(final_in))
            out = self.visual(images)
        finally:
            for h in handles:
                h.remove()
            for mod, was in fused:
                mod.fused_attn = was
        if wanted(tr.IMAGE_EMBED):
            cache[tr.IMAGE_EMBED] = out
        if wanted(tr.RESID_FINAL):
            with torch.autocast(out.device.type, enabled=False):
                cache.readout = self.readout(cache[tr.RESID_FINAL])
            if wanted(tr.POOL_PATTERN) and cache.readout.pool_pattern is not None:
                cache[tr.POOL_PATTERN] = cache.readout.pool_pattern
        return cache

