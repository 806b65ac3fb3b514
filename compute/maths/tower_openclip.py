"""open_clip's own VisionTransformer (class-token or average pooling), traced block by block.

The only module that touches open_clip's private helpers (`_embeds`, `_pool`). nn.MultiheadAttention's fused
path hides its attention pattern and applies W_O inside, so the attention is written out here exactly
(in_proj -> softmax or scaled_dot_product_attention -> W_O); the sum invariant proves it.

Readout: ln_post at the pooled token(s), then proj. With P = diag(gamma) proj - (1/W) 1 (gamma @ proj) (the
centring folded in), a pooled residual vector r reads as r @ P / sigma, and beta @ proj is the constant.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from compute.errors import AtlasError
from compute.maths import trace as tr
from compute.maths.trace import ActivationCache, HeadWrite, Keep, Norm, Readout, ReadMaps, Tower


def unsupported_reason(visual: torch.nn.Module) -> str | None:
    """Why this open_clip VisionTransformer cannot be traced and decomposed, or None."""
    if visual.attn_pool is not None:
        return "its vision tower ends in an attentional pooler (CoCa-style), which is not a sum of token terms"
    if visual.pool_type not in ("tok", "avg"):
        return f"pool_type {visual.pool_type!r} has no single embedding to decompose"
    blocks = visual.transformer.resblocks
    if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        return "its blocks use custom attention (qk-norm, scaled cosine, head scales or inner norms)"
    if any(hasattr(b, "ln_1_kv") for b in blocks):
        return "its blocks use cross-attention"
    if not visual.transformer.batch_first:
        return "its transformer is not batch-first"
    return None


def is_openclip_vit(visual: torch.nn.Module) -> bool:
    return isinstance(visual, VisionTransformer)


def _gamma(layer_scale: torch.nn.Module) -> torch.Tensor | None:
    return layer_scale.gamma if hasattr(layer_scale, "gamma") else None


class OpenClipViT(Tower):
    family = "open_clip ViT"

    def __init__(self, model: torch.nn.Module):
        reason = unsupported_reason(model.visual)
        if reason:
            raise AtlasError(f"cannot decompose: {reason}")
        self.visual = v = model.visual
        self.blocks = list(v.transformer.resblocks)
        self.n_layers = len(self.blocks)
        attn = self.blocks[0].attn
        self.n_heads, self.width = attn.num_heads, attn.embed_dim
        self.head_dim = self.width // self.n_heads
        self.embed_dim = v.output_dim if v.proj is None else v.proj.shape[1]
        self.grid = tuple(v.grid_size)
        self.image_size = tuple(v.image_size)
        self.pool_type = v.pool_type
        self.prefix = 1
        #: the pooled rows are averaged before the final norm (one sigma) rather than after (one per row)
        self.norm_after_pool = bool(v.final_ln_after_pool)
        p = next(v.parameters())
        self.stats_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32

    # ---- weights
    def pooled(self) -> slice:
        return slice(0, 1) if self.pool_type == "tok" else slice(1, None)

    def final_norm(self) -> Norm:
        ln = self.visual.ln_post
        return Norm(ln.weight, ln.bias, ln.eps)

    def ln1(self, layer: int) -> Norm:
        ln = self.blocks[layer].ln_1
        return Norm(ln.weight, ln.bias, ln.eps)

    def value_weight(self, layer: int) -> torch.Tensor:
        """[W_out, W_in]: W_V of every head, stacked."""
        return self.blocks[layer].attn.in_proj_weight[2 * self.width:]

    def mlp_scale(self, layer: int) -> torch.Tensor | None:
        """LayerScale gamma after the MLP, or None."""
        return _gamma(self.blocks[layer].ls_2)

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """[W, M]: column n is what neuron n writes per unit of activation (before LayerScale)."""
        return self.blocks[layer].mlp.c_proj.weight

    def neuron_unsupported_reason(self) -> str | None:
        """Why a neuron's write is not act * a column of the output weight, or None."""
        for blk in self.blocks:
            mlp = blk.mlp
            if not all(hasattr(mlp, n) for n in ("c_fc", "gelu", "c_proj")):
                return "its MLP blocks are not c_fc -> activation -> c_proj"
            if not isinstance(getattr(mlp, "ln", torch.nn.Identity()), torch.nn.Identity):
                return "its MLP blocks normalise inside the MLP (scale_fc), so a neuron's write is not act * weight"
        return None

    def head_write(self, layer: int) -> HeadWrite:
        blk, fd = self.blocks[layer], self.stats_dtype
        ls = _gamma(blk.ls_1)
        ls = ls.to(fd) if ls is not None else torch.ones(self.width, dtype=fd, device=blk.attn.out_proj.weight.device)
        wo, b = blk.attn.out_proj.weight.to(fd), blk.attn.out_proj.bias
        matrix = (wo.T * ls[None, :]).view(self.n_heads, self.head_dim, self.width)
        bias = b.to(fd) * ls if b is not None else torch.zeros_like(ls)
        return HeadWrite(matrix, bias)

    def read_maps(self) -> ReadMaps:
        fd, W = self.stats_dtype, self.width
        norm, proj = self.final_norm(), self.visual.proj
        dev = next(self.visual.parameters()).device
        gamma = norm.weight.to(fd) if norm.weight is not None else torch.ones(W, dtype=fd, device=dev)
        proj = proj.to(fd) if proj is not None else torch.eye(W, dtype=fd, device=dev)
        gp = gamma[:, None] * proj                                  # [W, D]
        return ReadMaps((gp - gp.sum(0, keepdim=True) / W)[None], None)

    def readout(self, x: torch.Tensor) -> Readout:
        """The frozen readout from the last residual stream x [B, N, W]."""
        fd, sl, norm = self.stats_dtype, self.pooled(), self.final_norm()
        rows = x[:, sl]
        r = rows.mean(1, keepdim=True) if self.norm_after_pool else rows
        sig = tr.sigma(r, norm.eps, fd)                             # [B, 1] or [B, n]
        n = rows.shape[1]
        weights = (1.0 / (n * sig)).expand(x.shape[0], n)[:, None]   # [B, 1, n]
        proj = self.visual.proj
        beta = torch.zeros(self.embed_dim, dtype=fd, device=x.device)
        if norm.bias is not None:
            beta = norm.bias.to(fd) @ proj.to(fd) if proj is not None else norm.bias.to(fd)
        return Readout(weights, beta.expand(x.shape[0], -1))

    # ---- the forward
    def run(self, images: torch.Tensor, keep: Keep) -> ActivationCache:
        wanted = tr.wants(keep)
        cache = ActivationCache(self.pooled())
        sl = cache.pooled
        x = self.visual._embeds(images)
        if wanted(tr.EMBED):
            cache[tr.EMBED] = x
        for i, blk in enumerate(self.blocks):
            if wanted(tr.LN1_SCALE.format(i)):
                cache[tr.LN1_SCALE.format(i)] = tr.sigma(x, blk.ln_1.eps, self.stats_dtype)
            x = x + blk.ls_1(self._attention(i, blk, blk.ln_1(x), sl, wanted, cache))
            name = tr.MLP_POST.format(i)
            if wanted(name):
                mlp = blk.mlp
                cache[name] = mlp.gelu(mlp.c_fc(blk.ln_2(x)))
                mlp_out = blk.ls_2(mlp.c_proj(cache[name]))
            else:
                mlp_out = blk.ls_2(blk.mlp(blk.ln_2(x)))
            if wanted(tr.MLP_OUT_POOLED.format(i)):
                cache[tr.MLP_OUT_POOLED.format(i)] = mlp_out[:, sl]
            x = x + mlp_out
        if wanted(tr.RESID_FINAL):
            cache[tr.RESID_FINAL] = x
            with torch.autocast(x.device.type, enabled=False):
                cache.readout = self.readout(x)
        if wanted(tr.IMAGE_EMBED):
            pooled, _ = self.visual._pool(x)
            cache[tr.IMAGE_EMBED] = pooled @ self.visual.proj if self.visual.proj is not None else pooled
        return cache

    def _attention(self, i: int, blk, h: torch.Tensor, sl: slice, wanted, cache: ActivationCache) -> torch.Tensor:
        """The block's attention; returns the output after W_O and its bias."""
        B, N, W = h.shape
        H, hd = self.n_heads, self.head_dim
        a = blk.attn
        qkv = F.linear(h, a.in_proj_weight, a.in_proj_bias).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # (B, H, N, hd)
        if wanted(tr.PATTERN.format(i)):
            p = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)     # (B, H, N, N)
            cache[tr.PATTERN.format(i)] = p
            z = p @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        if wanted(tr.PATTERN_POOLED.format(i)):
            cache[tr.PATTERN_POOLED.format(i)] = torch.softmax((q[:, :, sl] @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        if wanted(tr.VALUES.format(i)):
            cache[tr.VALUES.format(i)] = v
        if wanted(tr.Z_POOLED.format(i)):
            cache[tr.Z_POOLED.format(i)] = z[:, :, sl]
        return F.linear(z.transpose(1, 2).reshape(B, N, W), a.out_proj.weight, a.out_proj.bias)
