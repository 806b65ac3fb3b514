"""Direct-effect decomposition of a vision tower's image embedding.

The embedding is the tower's readout of its last residual stream, and the stream at every token is a sum of
writes, r = embed + sum_l (attn_l + mlp_l). With every statistic of the readout frozen at the values the
forward computed (trace.py: LayerNorm scales, an attention pool's weights, its MLP's gates) the readout is affine
in the stream:

    out = post( sum_k (sum_t weights[k, t] r_t) @ A[k] @ B[k] ) + const

so each write c has one linear contribution Lin(c), the contributions and `const` sum exactly to the output, and
dividing by ||out|| makes them add up to the L2-normalised embedding CLIP compares with text. For open_clip's
class-token ViTs this is the familiar ln_post(r) @ proj: K = 1, weights = 1/sigma at the class token, A = P
(gamma and centring folded into proj), no post, const = beta @ proj.

Each attention output splits further over heads (and, on request, source tokens). A head writes z_h @ M_h at a
token (W_O's slice, LayerScale and a sub-LN's gain and centring folded into M_h); folding M_h @ A[k] into one
[head_dim, K, r] matrix makes a head's contribution a small matmul on the readout-weighted attention output
sum_t weights[k, t] z_h[t], which the forward computes anyway. Per source token m, z_h[t] = sum_m a[t, m] v[m]:
the readout-weighted attention rows sum_t weights[k, t] a[t, m] play the part of the class token's row.

Only direct effects are decomposed: a head's effect through later layers is attributed to those later layers,
not to the head.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from compute.errors import AtlasError
from compute.maths import trace
from compute.maths.towers import tower

COMPONENT_KINDS = ("embed", "attn", "attn_bias", "mlp", "ln_bias")


@dataclass
class Decomposition:
    """Direct contributions to the L2-normalised embedding, all [B, ..., D]."""
    embedding: torch.Tensor   # [B, D]  normalised encode_image output
    embed: torch.Tensor       # [B, D]  class/patch embedding term (after ln_pre)
    attn: torch.Tensor        # [B, L, D]  sum of the layer's heads (out-proj bias excluded)
    attn_bias: torch.Tensor   # [B, L, D]  the out-projection bias term
    mlp: torch.Tensor         # [B, L, D]
    ln_bias: torch.Tensor     # [B, D]  the constant: norm betas, biases no write owns, an attention pool's query
    head_layers: list[int]
    heads: torch.Tensor       # [B, len(head_layers), H, D]
    token_layers: list[int]
    tokens: torch.Tensor | None  # [B, len(token_layers), H, N, D] per source token (N includes the class token);
                                 # [..., K] when projected on K token_directions
    pool_mlp: torch.Tensor | None = None   # [B, D] the part of the contributions that runs through an attention
                                           # pool's MLP with its gates frozen (None without a pool MLP)

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
    """Reads one traced forward pass (a `trace.Tower`) and returns a `Decomposition` per batch."""

    def __init__(self, model: torch.nn.Module, head_layers: Iterable[int] = (), token_layers: Iterable[int] = ()):
        self.tower = tower(model)
        self.n_layers = self.tower.n_layers
        self.head_layers = sorted(set(head_layers))
        self.token_layers = sorted(set(token_layers))
        self.n_heads, self.width, self.head_dim = self.tower.n_heads, self.tower.width, self.tower.head_dim
        self.fold_dtype = self.tower.stats_dtype
        self._fold()
        keep = {trace.Z_POOLED.format(i) for i in range(self.n_layers)}
        keep |= {trace.MLP_OUT_POOLED.format(i) for i in range(self.n_layers)}
        keep |= {trace.SUB_SCALE.format(i) for i in range(self.n_layers)}
        keep |= {trace.PATTERN_POOLED.format(i) for i in self.token_layers}
        keep |= {trace.VALUES.format(i) for i in self.token_layers}
        self._keep = keep | {trace.EMBED, trace.RESID_FINAL}

    @torch.no_grad()
    def _fold(self) -> None:
        maps = self.tower.read_maps()
        self.A, self.B = maps.A, maps.B                             # [K, W, r], [K, r, Dq] or None
        self.writes = [self.tower.head_write(i) for i in range(self.n_layers)]
        # head h's write read through channel k: [H, hd, K, r]
        self.R = torch.stack([torch.einsum("hdw,kwr->hdkr", w.matrix, self.A) for w in self.writes])   # [L, H, hd, K, r]
        self.bias_dir = torch.stack([torch.einsum("w,kwr->kr", w.bias, self.A) for w in self.writes])   # [L, K, r]
        self.scaled = [i for i, w in enumerate(self.writes) if w.scaled]
        # the class-token fast path (K = 1, no second factor): the fold the neurons and old callers read
        self.simple = self.A.shape[0] == 1 and self.B is None
        if self.simple:
            self.P = self.A[0]
            self.M = [r[:, :, 0] for r in self.R]                   # [H, hd, D]

    def channels(self, y: torch.Tensor) -> torch.Tensor:
        """[..., K, r] -> [..., Dq]: each channel's second factor, summed over channels."""
        return y[..., 0, :] if self.B is None else torch.einsum("...kr,krq->...q", y, self.B)

    def read(self, E: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Residual vectors at the read rows, each [B, n, W] -> [B, len(rows), Dq]: weighted by each channel's
        readout weights E [B, K, n], then through the channels' maps together, before the readout's per-image
        steps."""
        weighted = torch.stack([E @ r.to(E.dtype) for r in rows], 1)   # [B, T, K, W]
        return self.channels(torch.einsum("btkw,kwr->btkr", weighted, self.A))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, token_directions: torch.Tensor | None = None) -> Decomposition:
        """Decompose a batch. With `token_directions` [D, K'] (e.g. text embeddings), the per-token maps come back
        already projected on them, [B, L_t, H, N, K']: the projection is folded into each head's readout matrix,
        so a segmentation never builds the D-wide maps."""
        cache = self.tower.run(images, self._keep)
        x = cache[trace.RESID_FINAL]
        # the readout runs in the fold dtype even under autocast
        with torch.autocast(x.device.type, enabled=False):
            return self._readout(cache, token_directions)

    def _readout(self, cache: trace.ActivationCache, token_directions: torch.Tensor | None) -> Decomposition:
        fd, ro = self.fold_dtype, cache.readout
        E = ro.weights.to(fd)                                       # [B, K, n]
        post = ro.post if ro.steps else (lambda y: y)

        L, H, hd = self.n_layers, self.n_heads, self.head_dim
        terms = [cache[trace.EMBED][:, cache.pooled]] + [cache[trace.MLP_OUT_POOLED.format(i)] for i in range(L)]
        written = self.read(E, terms)                               # [B, 1 + L, Dq]
        embed, mlp = written[:, 0], written[:, 1:]
        # every layer at once (one batched matmul, not one per layer): the heads' outputs at the read rows,
        # concatenated over heads as the forward keeps them, weighted by each channel's readout weights
        z = torch.stack([cache[trace.Z_POOLED.format(i)].transpose(1, 2).flatten(2) for i in range(L)], 1).to(fd)
        El = E[:, None].expand(-1, L, -1, -1)                       # [B, L, K, n]
        if self.scaled:                                             # a sub-LN divides each token's write by its sigma
            s = torch.ones(E.shape[0], L, E.shape[-1], dtype=fd, device=E.device)
            for i in self.scaled:
                s[:, i] = cache[trace.SUB_SCALE.format(i)].to(fd)
            El = El * s[:, :, None]
        zbar = (El @ z).view(E.shape[0], L, E.shape[1], H, hd)     # [B, L, K, H, hd]
        heads = self.channels(torch.einsum("blkhd,lhdkr->blhkr", zbar, self.R))    # [B, L, H, Dq]
        # the output bias is written at every read row, so it carries the rows' total weight per channel
        bias = self.channels(torch.einsum("bk,lkr->blkr", E.sum(-1), self.bias_dir))   # [B, L, Dq]
        attn = heads.sum(2)
        pre_total = embed + mlp.sum(1) + attn.sum(1) + bias.sum(1)
        # post is linear: one pass for every part, a layer's heads as their sum and the stored layers' heads one by one
        stored = heads[:, self.head_layers].flatten(1, 2)           # [B, len(head_layers) * H, Dq]
        parts = post(torch.cat([embed[:, None], mlp, attn, bias, stored], 1))
        embed, mlp, attn, bias, heads = parts.split([1, L, L, L, stored.shape[1]], 1)
        embed, heads = embed[:, 0], heads.unflatten(1, (len(self.head_layers), H))   # [B, D], [B, len, H, D]
        const = ro.const().to(fd)                                   # [B, D]
        out = embed + mlp.sum(1) + attn.sum(1) + bias.sum(1) + const
        norm = out.norm(dim=-1, keepdim=True)                       # [B, 1]
        pool_mlp = ro.mlp_branch(pre_total) / norm if ro.steps else None
        tokens = None
        if self.token_layers:
            dirs = None if token_directions is None else token_directions.to(device=out.device, dtype=fd)
            tokens = torch.stack([self._token_maps(i, E, cache, ro, norm, dirs) for i in self.token_layers], 1)
        return Decomposition(
            embedding=out / norm, embed=embed / norm, attn=attn / norm[:, None], attn_bias=bias / norm[:, None],
            mlp=mlp / norm[:, None], ln_bias=const / norm, head_layers=self.head_layers,
            heads=heads / norm[:, None, None], token_layers=self.token_layers, tokens=tokens, pool_mlp=pool_mlp,
        )

    def _token_maps(self, layer: int, E: torch.Tensor, cache: trace.ActivationCache, ro: trace.Readout,
                    norm: torch.Tensor, directions: torch.Tensor | None) -> torch.Tensor:
        """[B, H, N, D] (or [B, H, N, K'] projected on `directions` [D, K']): each source token's contribution
        through each head of `layer`."""
        fd = self.fold_dtype
        probs, vals = cache[trace.PATTERN_POOLED.format(layer)].to(fd), cache[trace.VALUES.format(layer)].to(fd)
        if self.writes[layer].scaled:
            E = E * cache[trace.SUB_SCALE.format(layer)].to(fd)[:, None]
        E = E / norm[:, :, None]
        eff = torch.einsum("bkt,bhtm->bhkm", E, probs)             # readout-weighted attention to each token
        if self.simple and not ro.steps:
            M = self.M[layer] if directions is None else self.M[layer] @ directions
            return torch.einsum("bhmk,hkd->bhmd", eff[:, :, 0, :, None] * vals, M)
        # directions read back through the post steps and the channels' second factors, per image
        B = vals.shape[0]
        dirs = directions if directions is not None else torch.eye(ro.const().shape[-1], dtype=fd, device=vals.device)
        back = ro.post_T(dirs.T[None].expand(B, -1, -1).contiguous()) if ro.steps else dirs.T[None].expand(B, -1, -1)
        back = back.transpose(1, 2)                                 # [B, Dq, K']
        F = back[:, None] if self.B is None else torch.einsum("krq,bqj->bkrj", self.B, back)   # [B, K, r, K']
        R = self.R[layer]                                           # [H, hd, K, r]
        if F.shape[-1] < R.shape[-1]:                               # few directions (texts): fold them in first
            RF = torch.einsum("hdkr,bkrj->bhdkj", R, F)             # [B, H, hd, K, K']
            X = torch.einsum("bhkm,bhdkj->bhmdj", eff, RF)         # [B, H, N, hd, K']
            return torch.einsum("bhmd,bhmdj->bhmj", vals, X)
        per_token = torch.einsum("bhmd,hdkr->bhmkr", vals, R)
        return torch.einsum("bhkm,bhmkr,bkrj->bhmj", eff, per_token, F)
