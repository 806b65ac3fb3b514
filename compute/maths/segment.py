"""Heatmaps from per-token direct contributions: topic and contrastive segmentation, which head sees it, IoU."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class TokenMaps:
    """One image's per-token contributions: [L_t, H, N, D] for `layers`; the first `prefix` tokens (a class
    token, registers) have no place in the image, the rest are the patch grid."""
    layers: list[int]
    tokens: torch.Tensor
    grid: tuple[int, int]
    prefix: int = 1



def select(maps: TokenMaps, heads: list[tuple[int, int]] | None) -> torch.Tensor:
    """Sum of the chosen (layer, head) token maps, or of all of them: [N, D]."""
    if heads is None:
        return maps.tokens.sum((0, 1))
    idx = {l: i for i, l in enumerate(maps.layers)}
    return sum(maps.tokens[idx[l], h] for l, h in heads)


def _text(maps: TokenMaps, text: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(text, dtype=maps.tokens.dtype, device=maps.tokens.device).reshape(-1)


def _grid(maps: TokenMaps, scores: torch.Tensor) -> np.ndarray:
    """[..., N-1] patch scores -> [..., gh, gw] float numpy."""
    n = maps.grid[0] * maps.grid[1]
    if scores.shape[-1] != n:
        raise ValueError(f"expected {n} patch tokens, got {scores.shape[-1]}")
    return scores.reshape(*scores.shape[:-1], *maps.grid).float().cpu().numpy()


def heatmap(maps: TokenMaps, text: torch.Tensor | np.ndarray, heads: list[tuple[int, int]] | None = None,
            without: list[tuple[int, int]] | None = None) -> np.ndarray:
    """Per patch, the selected contributions dotted with a text embedding: [gh, gw] float. `without` leaves
    heads out of the selection (the map of a model whose heads are ablated)."""
    t = _text(maps, text)
    tokens = select(maps, heads)
    if without:
        tokens = tokens - select(maps, without)
    return _grid(maps, tokens[maps.prefix:] @ t)     # a class token has no place in the image


@dataclass
class HeadShare:
    """One head's map for a text and its share of the total: `score` is the map's sum over patches (the head's
    patch tokens' part of image . text) and `share` = score / sum over heads of |score|."""
    layer: int
    head: int
    score: float
    share: float
    heat: np.ndarray


def which_heads(maps: TokenMaps, text: torch.Tensor | np.ndarray, k: int | None = None) -> list[HeadShare]:
    """Every head's map for a text, ranked by its share of the total, largest first ("which head sees it")."""
    per = _grid(maps, maps.tokens[:, :, maps.prefix:] @ _text(maps, text))    # [L_t, H, gh, gw]
    scores = per.reshape(*per.shape[:2], -1).astype(np.float64).sum(-1)
    total = float(np.abs(scores).sum()) or 1.0
    order = np.argsort(-scores, axis=None, kind="stable")[:k]
    return [HeadShare(maps.layers[li], int(h), float(scores[li, h]), float(scores[li, h] / total), per[li, h])
            for li, h in zip(*np.unravel_index(order, scores.shape))]


def contrastive(maps: TokenMaps, text_a: torch.Tensor, text_b: torch.Tensor,
                heads: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(A - B, B - A): where the image speaks for A rather than B, and the reverse. Same scale by construction."""
    diff = heatmap(maps, text_a, heads) - heatmap(maps, text_b, heads)
    return diff, -diff


def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a patch grid to (height, width)."""
    t = torch.from_numpy(np.ascontiguousarray(grid, np.float32))[None, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()





def iou_at_mean(heat: np.ndarray, mask: np.ndarray) -> float:
    """IoU of the map thresholded at its mean (the paper's protocol) with a boolean mask of the same size."""
    pred = heat > heat.mean()
    union = np.logical_or(pred, mask).sum()
    return float(np.logical_and(pred, mask).sum() / union) if union else 0.0
