"""Saliency baselines for zero-shot segmentation: raw attention, rollout, Grad-CAM, Chefer et al.

All four read the attention probabilities A_l [B, H, N, N] of every block (token 0 is the class
token) and, for the gradient methods, dS/dA_l, where S is the image-text score: the cosine of the
image embedding with the image's text embedding. One traced forward and one backward per batch
serve all four (images in a batch do not interact, so the gradient of the summed scores is each
image's own gradient).

With P the pooled query rows (the class token for 'tok' pooling, the patch tokens for 'avg'):
- raw attention:  mean over heads of A_L[P, patches]   (last layer)
- rollout (Abnar and Zuidema 2020):  A'_l = row-normalise((mean_h A_l + I) / 2),
  R = A'_L ... A'_1, map = R[P, patches]
- Grad-CAM (on the last block's attention map, as Chefer et al.'s ViT baseline does; the last
  block's output tokens would not do for class-token pooling, whose score ignores them):
  w_h = mean over P and patches of dS/dA_L[h, P, patches], map = ReLU(mean_h w_h A_L[h, P, patches])
- Chefer et al. 2021:  R = I; for each layer l = 1..L, Abar = mean_h ReLU(dS/dA_l * A_l),
  R = R + Abar R; map = R[P, patches]
Several pooled rows (avg pooling) are averaged (before the ReLU in Grad-CAM). Maps are [B, grid_h, grid_w].
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compute.maths import trace
from compute.maths.trace import Tower

BASELINES = ("attention", "rollout", "gradcam", "chefer")
GRADIENT_METHODS = ("gradcam", "chefer")


@dataclass
class AttentionTrace:
    embedding: torch.Tensor        # [B, D] the model's encode_image output (not normalised)
    probs: list[torch.Tensor]      # per block [B, H, N, N]
    pooled: slice                  # query rows the embedding pools (class token; patches for avg pooling)
    prefix: int = 1                # tokens before the patch grid
    pool: torch.Tensor | None = None   # [B, K, N] an attention pool's weights over the tokens (0 where it does not look)
    pool_rows: torch.Tensor | None = None   # [B, K, n] the same over the rows it reads (the autograd leaf of `pool`)


def trace_attention(tower: Tower, images: torch.Tensor) -> AttentionTrace:
    """The tower's traced forward keeping every attention matrix (in the autograd graph when gradients are
    enabled), an attention pool's weights, and the tower's output, which equals `encode_image`."""
    keep = {trace.PATTERN.format(i) for i in range(tower.n_layers)} | {trace.IMAGE_EMBED}
    if tower.pool_type == "map":
        keep |= {trace.RESID_FINAL, trace.POOL_PATTERN}
    cache = tower.run(images, keep)
    probs = [cache[trace.PATTERN.format(i)] for i in range(tower.n_layers)]
    pool, embedding = None, cache[trace.IMAGE_EMBED]
    if tower.pool_type == "map":
        rows = cache[trace.POOL_PATTERN]                          # [B, K, n] over the read rows
        pool = _pad(rows, cache.pooled.start)
        embedding = cache.readout.pool_out                        # equal to the forward's, and a function of `rows`
        return AttentionTrace(embedding, probs, cache.pooled, tower.prefix, pool, rows)
    return AttentionTrace(embedding, probs, cache.pooled, tower.prefix)


def _pad(rows: torch.Tensor, start: int) -> torch.Tensor:
    """[B, K, n] over the read rows -> [B, K, N] over every token (0 before the read rows)."""
    return torch.cat([rows.new_zeros(*rows.shape[:2], start), rows], -1)


def _query(m: torch.Tensor, tr: AttentionTrace) -> torch.Tensor:
    """[B, N, N] token-to-token matrix -> what the readout's query sees of each patch, [B, patches]: the pooled
    rows' mean, or the attention pool's row (mean over its heads) times the matrix."""
    if tr.pool is None:
        return m[:, tr.pooled, tr.prefix:].mean(1)
    return (tr.pool.mean(1)[:, None] @ m)[:, 0, tr.prefix:]


def raw_attention(tr: AttentionTrace) -> torch.Tensor:
    """The last attention the readout's query applies: the last block's pooled rows, or the pool's own row."""
    if tr.pool is not None:
        return tr.pool.mean(1)[:, tr.prefix:]
    return _query(tr.probs[-1].mean(1), tr)


def rollout(tr: AttentionTrace) -> torch.Tensor:
    """Attention rollout; with identity attention every layer it is the identity."""
    return _query(rollout_matrix(tr.probs), tr)


def rollout_matrix(probs: list[torch.Tensor]) -> torch.Tensor:
    """R = A'_L ... A'_1 with A'_l = row-normalise((mean_h A_l + I) / 2): [B, N, N]."""
    B, _, N, _ = probs[0].shape
    eye = torch.eye(N, dtype=probs[0].dtype, device=probs[0].device)
    R = eye.expand(B, N, N)
    for p in probs:
        a = (p.mean(1) + eye) / 2
        a = a / a.sum(-1, keepdim=True)
        R = a @ R
    return R


def gradcam(tr: AttentionTrace, grads: list[torch.Tensor], pool_grad: torch.Tensor | None = None) -> torch.Tensor:
    """On the last attention map the readout's query applies (the pool's, for an attention-pool tower)."""
    if tr.pool is not None:
        a, g = tr.pool[:, :, tr.prefix:], pool_grad[:, :, tr.prefix:]           # [B, K, patches]
        return (g.mean(-1, keepdim=True) * a).mean(1).clamp(min=0)
    a, g = tr.probs[-1], grads[-1]                                # [B, H, N, N]
    w = g[:, :, tr.pooled, tr.prefix:].mean((-1, -2))             # [B, H]: one weight per head
    return (w[..., None] * a[:, :, tr.pooled, tr.prefix:].mean(2)).mean(1).clamp(min=0)


def chefer(tr: AttentionTrace, grads: list[torch.Tensor], pool_grad: torch.Tensor | None = None) -> torch.Tensor:
    """Chefer et al.; an attention pool is one more layer whose only query is its latent: its row is
    mean_k ReLU(dS/da * a) @ R (the latent is not a token, so no identity term)."""
    B, _, N, _ = tr.probs[0].shape
    R = torch.eye(N, dtype=tr.probs[0].dtype, device=tr.probs[0].device).expand(B, N, N)
    for a, g in zip(tr.probs, grads):
        abar = (g * a).clamp(min=0).mean(1)
        R = R + abar @ R
    if tr.pool is not None:
        return ((pool_grad * tr.pool).clamp(min=0).mean(1)[:, None] @ R)[:, 0, tr.prefix:]
    return _query(R, tr)


def baseline_maps(tower: Tower, images: torch.Tensor, texts: torch.Tensor,
                  methods: tuple[str, ...] = BASELINES) -> dict[str, torch.Tensor]:
    """{method: [B, grid_h, grid_w]} for the images against their own text embeddings `texts` [B, D]."""
    unknown = set(methods) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)}")
    need_grad = any(m in GRADIENT_METHODS for m in methods)
    with torch.enable_grad() if need_grad else torch.no_grad():
        traced = trace_attention(tower, images)
        grads = pool_grad = None
        if need_grad:
            score = (F.normalize(traced.embedding.float(), dim=-1) * texts.float()).sum()
            wrt = traced.probs + ([traced.pool_rows] if traced.pool is not None else [])
            grads = [g.detach() for g in torch.autograd.grad(score, wrt)]
            if traced.pool is not None:
                grads, pool_grad = grads[:-1], _pad(grads[-1], traced.pooled.start)
    traced = AttentionTrace(traced.embedding.detach(), [p.detach() for p in traced.probs], traced.pooled,
                            traced.prefix, None if traced.pool is None else traced.pool.detach())
    gh, gw = tower.grid
    fns = {"attention": lambda: raw_attention(traced), "rollout": lambda: rollout(traced),
           "gradcam": lambda: gradcam(traced, grads, pool_grad), "chefer": lambda: chefer(traced, grads, pool_grad)}
    return {m: fns[m]().reshape(-1, gh, gw) for m in methods}
