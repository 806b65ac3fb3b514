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
    pooled: slice                  # query rows the embedding pools


def trace_attention(tower: Tower, images: torch.Tensor) -> AttentionTrace:
    """The tower's traced forward keeping every attention matrix (in the autograd graph when gradients are
    enabled) and the tower's output, which equals `encode_image`."""
    keep = {trace.PATTERN.format(i) for i in range(tower.n_layers)} | {trace.IMAGE_EMBED}
    cache = tower.run(images, keep)
    probs = [cache[trace.PATTERN.format(i)] for i in range(tower.n_layers)]
    return AttentionTrace(cache[trace.IMAGE_EMBED], probs, cache.pooled)


def _patch_row(m: torch.Tensor, pooled: slice) -> torch.Tensor:
    """[B, N, N] -> the pooled rows' mean over the patch columns, [B, N - 1]."""
    return m[:, pooled, 1:].mean(1)


def raw_attention(probs: list[torch.Tensor], pooled: slice) -> torch.Tensor:
    return _patch_row(probs[-1].mean(1), pooled)


def rollout(probs: list[torch.Tensor], pooled: slice) -> torch.Tensor:
    """Attention rollout; with identity attention every layer it is the identity."""
    return _patch_row(rollout_matrix(probs), pooled)


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


def gradcam(probs: list[torch.Tensor], grads: list[torch.Tensor], pooled: slice) -> torch.Tensor:
    a, g = probs[-1], grads[-1]                                   # [B, H, N, N]
    w = g[:, :, pooled, 1:].mean((-1, -2))                        # [B, H]: one weight per head
    return (w[..., None] * a[:, :, pooled, 1:].mean(2)).mean(1).clamp(min=0)


def chefer(probs: list[torch.Tensor], grads: list[torch.Tensor], pooled: slice) -> torch.Tensor:
    B, _, N, _ = probs[0].shape
    R = torch.eye(N, dtype=probs[0].dtype, device=probs[0].device).expand(B, N, N)
    for a, g in zip(probs, grads):
        abar = (g * a).clamp(min=0).mean(1)
        R = R + abar @ R
    return _patch_row(R, pooled)


def baseline_maps(tower: Tower, images: torch.Tensor, texts: torch.Tensor,
                  methods: tuple[str, ...] = BASELINES) -> dict[str, torch.Tensor]:
    """{method: [B, grid_h, grid_w]} for the images against their own text embeddings `texts` [B, D]."""
    unknown = set(methods) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown saliency methods {sorted(unknown)}")
    need_grad = any(m in GRADIENT_METHODS for m in methods)
    with torch.enable_grad() if need_grad else torch.no_grad():
        traced = trace_attention(tower, images)
        grads = None
        if need_grad:
            score = (F.normalize(traced.embedding.float(), dim=-1) * texts.float()).sum()
            grads = [g.detach() for g in torch.autograd.grad(score, traced.probs)]
    probs = [p.detach() for p in traced.probs]
    gh, gw = tower.grid
    fns = {"attention": lambda: raw_attention(probs, traced.pooled), "rollout": lambda: rollout(probs, traced.pooled),
           "gradcam": lambda: gradcam(probs, grads, traced.pooled), "chefer": lambda: chefer(probs, grads, traced.pooled)}
    return {m: fns[m]().reshape(-1, gh, gw) for m in methods}
