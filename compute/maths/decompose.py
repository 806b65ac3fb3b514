"""Direct-effect decomposition of an open_clip ViT image embedding.

The image embedding is ln_post(r) @ proj with r the pooled residual stream,
r = embed + sum_l (attn_l + mlp_l). LayerNorm's centering is linear and its
scale 1/sigma is one number per pooled token, so with the readout matrix

    P = diag(gamma) proj - (1/W) 1 (gamma @ proj)       (centering folded in)

every summand c of r contributes c @ P / (sigma * ||out||) to the L2-normalised
embedding, and beta @ proj / ||out|| is one more constant term. Each attention
output splits further over heads (and, on request, source tokens); folding the
head's slice of W_O, LayerScale and P into one [head_dim, D] matrix makes a
head's contribution a small matmul on the class-token row of the attention
output, which the forward pass computes anyway.

Only direct effects are decomposed: a head's effect through later layers is
attributed to those later layers, not to the head.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from ..errors import AtlasError

COMPONENT_KINDS = ("embed", "attn", "attn_bias", "mlp", "ln_bias")


@dataclass
class Decomposition:
    """Direct contributions to the L2-normalised embedding, all [B, ..., D]."""
    embedding: torch.Tensor   # [B, D]  normalised encode_image output
    embed: torch.Tensor       # [B, D]  class/patch embedding term (after ln_pre)
    attn: torch.Tensor        # [B, L, D]  sum of the layer's heads (out-proj bias excluded)
    attn_bias: torch.Tensor   # [B, L, D]  the out-projection bias term
    mlp: torch.Tensor         # [B, L, D]
    ln_bias: torch.Tensor     # [B, D]  ln_post's beta term
    head_layers: list[int]
    heads: torch.Tensor       # [B, len(head_layers), H, D]
    token_layers: list[int]
    tokens: torch.Tensor | None  # [B, len(token_layers), H, N, D] per source token (N includes the class token);
                                 # [..., K] when projected on K token_directions

    def total(self) -> torch.Tensor:
        """The sum of all components; equals `embedding` up to float error."""
        return self.embed + self.attn.sum(1) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.ln_bias


def resolve_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """'last4' | 'all' | 'none' | 'L1,L2' (negative counts from the end) -> sorted layer indices."""
    if spec is None or spec == "none" or spec == "":
        return []
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_layers))
        if s.startswith("last"):
            try:
                k = int(s[4:])
            except ValueError:
                raise AtlasError(f"bad layer selection {spec!r}: use lastK, all, or a comma list") from None
            return list(range(max(0, n_layers - k), n_layers))
        try:
            items = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise AtlasError(f"bad layer selection {spec!r}: use lastK, all, or a comma list like 8,9,10,11") from None
    else:
        items = list(spec)
    out = set()
    for i in items:
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise AtlasError(f"layer {i} out of range for a model with {n_layers} layers")
        out.add(j)
    return sorted(out)


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the direct-effect decomposition does not fit this model's vision tower, or None."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
    visual = getattr(model, "visual", None)
    if visual is None:
        return "the model has no vision tower"
    kind = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        why = {"ModifiedResNet": "a ResNet tower (attention pooling over conv features)",
               "TimmModel": "a timm tower (EVA, SigLIP, ConvNeXt, PE-Core: different blocks and pooling heads)"}
        return f"its vision tower is {why.get(kind, kind)}; only open_clip VisionTransformer towers decompose"
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


class Decomposer:
    """Runs the vision tower block by block and returns a `Decomposition` per batch."""

    def __init__(self, model: torch.nn.Module, head_layers: Iterable[int] = (), token_layers: Iterable[int] = ()):
        reason = unsupported_reason(model)
        if reason:
            raise AtlasError(f"cannot decompose: {reason}")
        self.visual = model.visual
        self.blocks = list(self.visual.transformer.resblocks)
        self.n_layers = len(self.blocks)
        self.head_layers = sorted(set(head_layers))
        self.token_layers = sorted(set(token_layers))
        attn = self.blocks[0].attn
        self.n_heads, self.width = attn.num_heads, attn.embed_dim
        self.head_dim = self.width // self.n_heads
        p = next(self.visual.parameters())
        self.fold_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        self._fold()

    @torch.no_grad()
    def _fold(self) -> None:
        v, fd = self.visual, self.fold_dtype
        ln = v.ln_post
        W = self.width
        dev = ln.weight.device if ln.weight is not None else v.conv1.weight.device
        gamma = ln.weight.to(fd) if ln.weight is not None else torch.ones(W, dtype=fd, device=dev)
        proj = v.proj.to(fd) if v.proj is not None else torch.eye(W, dtype=fd, device=dev)
        gp = gamma[:, None] * proj                                  # [W, D]
        self.P = gp - gp.sum(0, keepdim=True) / W                   # centering folded in
        self.beta_proj = (ln.bias.to(fd) @ proj) if ln.bias is not None else torch.zeros(proj.shape[1], dtype=fd, device=proj.device)
        self.eps = ln.eps
        H, hd = self.n_heads, self.head_dim
        self.M, self.bias_dir = [], []
        for blk in self.blocks:
            ls = blk.ls_1.gamma.to(fd) if hasattr(blk.ls_1, "gamma") else torch.ones(W, dtype=fd, device=gamma.device)
            wo = blk.attn.out_proj.weight.to(fd)                    # [W_out, W_in]
            folded = (wo.T * ls[None, :]) @ self.P                  # [W_in, D]
            self.M.append(folded.view(H, hd, -1))                   # [H, hd, D]
            b = blk.attn.out_proj.bias
            self.bias_dir.append((b.to(fd) * ls) @ self.P if b is not None else torch.zeros_like(self.beta_proj))

    def _pool_slice(self) -> slice:
        """The residual rows the readout pools: the class token, or every patch token (average pooling)."""
        return slice(0, 1) if self.visual.pool_type == "tok" else slice(1, None)

    def _attention(self, blk, h: torch.Tensor, sl: slice, want_tokens: bool):
        """Exact re-implementation of the block's attention, returning what the decomposition needs."""
        B, N, W = h.shape
        H, hd = self.n_heads, self.head_dim
        a = blk.attn
        qkv = F.linear(h, a.in_proj_weight, a.in_proj_bias).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # [B, H, N, hd]
        z = F.scaled_dot_product_attention(q, k, v)
        out = F.linear(z.transpose(1, 2).reshape(B, N, W), a.out_proj.weight, a.out_proj.bias)
        probs = None
        if want_tokens:
            # only the pooled query rows: [B, H, n_pooled, N]; for class-token pooling that is one row
            probs = torch.softmax((q[:, :, sl] @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        return out, z[:, :, sl], probs, v

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, token_directions: torch.Tensor | None = None) -> Decomposition:
        """Decompose a batch. With `token_directions` [D, K] (e.g. text embeddings), the per-token maps come back
        already projected on them, [B, L_t, H, N, K]: the projection is folded into each head's readout matrix, so
        a segmentation never builds the D-wide maps."""
        v = self.visual
        sl = self._pool_slice()
        x = v._embeds(images)
        terms = [x[:, sl]]                                          # residual terms at pooled tokens
        z_sel, maps_in = {}, {}
        for i, blk in enumerate(self.blocks):
            want_tok = i in self.token_layers
            attn_out, z, probs, vals = self._attention(blk, blk.ln_1(x), sl, want_tok)
            attn_out = blk.ls_1(attn_out)
            x = x + attn_out
            mlp_out = blk.ls_2(blk.mlp(blk.ln_2(x)))
            x = x + mlp_out
            z_sel[i] = z
            terms.append(mlp_out[:, sl])
            if want_tok:
                maps_in[i] = (probs, vals)
        # the readout runs in the fold dtype even under autocast
        with torch.autocast(x.device.type, enabled=False):
            return self._readout(x, sl, terms, z_sel, maps_in, token_directions)

    def readout_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_pooled]: the weight of each pooled token's residual in the readout, pooling weight / sigma (the
        L2 normalisation, / ||out||, comes on top)."""
        sl = self._pool_slice()
        r = x[:, sl].mean(1, keepdim=True) if self.visual.final_ln_after_pool else x[:, sl]
        sigma = torch.sqrt(r.to(self.fold_dtype).var(-1, unbiased=False) + self.eps)   # [B, 1] or [B, n]
        n_pool = x[:, sl].shape[1]
        return (1.0 / (n_pool * sigma)).expand(x.shape[0], n_pool)

    def _readout(self, x, sl, terms, z_sel, maps_in, token_directions=None) -> Decomposition:
        fd = self.fold_dtype
        w = self.readout_weights(x)                                 # [B, n_pool]
        embed, *mlp = [torch.einsum("bt,btw->bw", w, t.to(fd)) @ self.P for t in terms]
        mlp = torch.stack(mlp, 1)                                   # [B, L, D]
        heads = torch.stack([torch.einsum("bhk,hkd->bhd", torch.einsum("bt,bhtk->bhk", w, z_sel[i].to(fd)), self.M[i])
                             for i in range(self.n_layers)], 1)     # [B, L, H, D]
        # the out-projection bias is added at every pooled token, so it carries their total weight
        bias = w.sum(1)[:, None, None] * torch.stack(self.bias_dir)[None]   # [B, L, D]
        out = embed + mlp.sum(1) + heads.sum((1, 2)) + bias.sum(1) + self.beta_proj
        norm = out.norm(dim=-1, keepdim=True)                       # [B, 1]
        tokens = None
        if self.token_layers:
            dirs = None if token_directions is None else token_directions.to(device=out.device, dtype=fd)
            tokens = torch.stack([self._token_maps(i, w / norm, *maps_in[i], dirs) for i in self.token_layers], 1)
        heads = heads / norm[:, None, None]
        return Decomposition(
            embedding=out / norm, embed=embed / norm, attn=heads.sum(2), attn_bias=bias / norm[:, None],
            mlp=mlp / norm[:, None], ln_bias=self.beta_proj / norm, head_layers=self.head_layers,
            heads=heads[:, self.head_layers], token_layers=self.token_layers, tokens=tokens,
        )

    def _token_maps(self, layer: int, w: torch.Tensor, probs: torch.Tensor, vals: torch.Tensor,
                    directions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H, N, D] (or [B, H, N, K] projected on `directions`): each source token's contribution through each
        head of `layer`."""
        fd = self.fold_dtype
        eff = torch.einsum("bt,bhtm->bhm", w, probs.to(fd))          # readout-weighted attention to each token
        M = self.M[layer] if directions is None else self.M[layer] @ directions
        return torch.einsum("bhmk,hkd->bhmd", eff[..., None] * vals.to(fd), M)
