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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from compute.errors import AtlasError
from compute.maths import trace
from compute.maths.trace import Tower

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

    def components(self) -> torch.Tensor:
        """[B, K, D]: every component as one stack, in the order of `component_layout` (embed, then attn,
        attn_bias and mlp per layer, then ln_bias)."""
        per_layer = torch.stack([self.attn, self.attn_bias, self.mlp], 2).flatten(1, 2)   # [B, 3L, D]
        return torch.cat([self.embed[:, None], per_layer, self.ln_bias[:, None]], 1)

    def total(self) -> torch.Tensor:
        """The sum of all components; equals `embedding` up to float error."""
        return self.embed + self.attn.sum(1) + self.attn_bias.sum(1) + self.mlp.sum(1) + self.ln_bias


def component_layout(n_layers: int) -> tuple[list[str], list[int | None]]:
    """(kind, layer) of each row of `Decomposition.components()`; layer is None for embed and ln_bias."""
    kinds: list[str] = ["embed"]
    layers: list[int | None] = [None]
    for layer in range(n_layers):
        kinds += ["attn", "attn_bias", "mlp"]
        layers += [layer] * 3
    return kinds + ["ln_bias"], layers + [None]


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


class Decomposer:
    """Reads one traced forward pass (`trace.Tower`) and returns a `Decomposition` per batch."""

    def __init__(self, model: torch.nn.Module, head_layers: Iterable[int] = (), token_layers: Iterable[int] = ()):
        self.tower = Tower(model)
        self.n_layers = self.tower.n_layers
        self.head_layers = sorted(set(head_layers))
        self.token_layers = sorted(set(token_layers))
        self.n_heads, self.width, self.head_dim = self.tower.n_heads, self.tower.width, self.tower.head_dim
        self.fold_dtype = self.tower.stats_dtype
        self._fold()
        keep = {trace.Z_POOLED.format(i) for i in range(self.n_layers)}
        keep |= {trace.MLP_OUT_POOLED.format(i) for i in range(self.n_layers)}
        keep |= {trace.PATTERN_POOLED.format(i) for i in self.token_layers}
        keep |= {trace.VALUES.format(i) for i in self.token_layers}
        self._keep = keep | {trace.EMBED, trace.RESID_FINAL}

    @torch.no_grad()
    def _fold(self) -> None:
        t, fd = self.tower, self.fold_dtype
        W = self.width
        norm, proj = t.final_norm(), t.proj()
        dev = next(t.visual.parameters()).device
        ones = torch.ones(W, dtype=fd, device=dev)
        gamma = norm.weight.to(fd) if norm.weight is not None else ones
        proj = proj.to(fd) if proj is not None else torch.eye(W, dtype=fd, device=dev)
        gp = gamma[:, None] * proj                                  # [W, D]
        self.P = gp - gp.sum(0, keepdim=True) / W                   # centering folded in
        self.beta_proj = (norm.bias.to(fd) @ proj) if norm.bias is not None else torch.zeros(proj.shape[1], dtype=fd, device=dev)
        self.eps = norm.eps
        H, hd = self.n_heads, self.head_dim
        self.M, self.bias_dir = [], []
        for layer in range(self.n_layers):
            ls = t.attn_scale(layer)
            ls = ls.to(fd) if ls is not None else ones
            wo, b = t.out_proj(layer)                               # [W_out, W_in]
            folded = (wo.to(fd).T * ls[None, :]) @ self.P           # [W_in, D]
            self.M.append(folded.view(H, hd, -1))                   # [H, hd, D]
            self.bias_dir.append((b.to(fd) * ls) @ self.P if b is not None else torch.zeros_like(self.beta_proj))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, token_directions: torch.Tensor | None = None) -> Decomposition:
        """Decompose a batch. With `token_directions` [D, K] (e.g. text embeddings), the per-token maps come back
        already projected on them, [B, L_t, H, N, K]: the projection is folded into each head's readout matrix, so
        a segmentation never builds the D-wide maps."""
        cache = self.tower.run(images, self._keep)
        sl = cache.pooled
        terms = [cache[trace.EMBED][:, sl]] + [cache[trace.MLP_OUT_POOLED.format(i)] for i in range(self.n_layers)]
        z_sel = cache.layers(trace.Z_POOLED)
        maps_in = {i: (cache[trace.PATTERN_POOLED.format(i)], cache[trace.VALUES.format(i)]) for i in self.token_layers}
        x = cache[trace.RESID_FINAL]
        # the readout runs in the fold dtype even under autocast
        with torch.autocast(x.device.type, enabled=False):
            return self._readout(x, sl, terms, z_sel, maps_in, token_directions)

    def readout_weights(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n_pooled]: the weight of each pooled token's residual in the readout, pooling weight / sigma (the
        L2 normalisation, / ||out||, comes on top)."""
        sl = self.tower.pooled()
        r = x[:, sl].mean(1, keepdim=True) if self.tower.norm_after_pool else x[:, sl]
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
