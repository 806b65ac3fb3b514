"""Describe one image in words: each head's contribution read along the head's TextSpan directions.

TextSpan gives head h an orthonormal set of directions d_h1 .. d_hm in the embedding space, each named by the
text it was picked for (textspan.md). TextSpan works on centred contributions, and so does this: the mean
mu_h over the run's images is what every image writes through h, so it says nothing about this one. The
image's centred contribution splits as

    c_h(x) - mu_h = sum_j p_hj d_hj + r_h(x),      p_hj = (c_h(x) - mu_h) . d_hj,

with r_h orthogonal to the head's span (what its texts do not describe). p_hj is how much further than the
average image this image's embedding moves along text j's direction because of head h: a length in the
units of the embedding, comparable across heads, since every head writes into the same embedding.

The overall description adds the p of one text over the heads that picked it (a text may name directions of
several heads) and ranks texts by that sum: the texts the image's head contributions express most, each with
the heads behind it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SpanScore:
    """One (head, text) pair: p_hj, and the share of the head's centred contribution the direction carries."""
    layer: int
    head: int
    rank: int
    text: str
    score: float
    share: float          # p_hj^2 / |c_h(x) - mu_h|^2


def span_scores(contributions: dict[tuple[int, int], np.ndarray], means: dict[tuple[int, int], np.ndarray],
                picks: list[tuple[int, int, int, str, np.ndarray]]) -> list[SpanScore]:
    """p_hj for every TextSpan pick (layer, head, rank, text, direction) of a head in `contributions`."""
    centred = {lh: np.asarray(c, np.float64) - np.asarray(means[lh], np.float64) for lh, c in contributions.items()}
    energy = {lh: float(v @ v) for lh, v in centred.items()}
    out = []
    for layer, head, rank, text, direction in picks:
        v = centred.get((layer, head))
        if v is None:
            continue
        p = float(v @ np.asarray(direction, np.float64))
        out.append(SpanScore(layer, head, rank, text, p, p * p / energy[(layer, head)] if energy[(layer, head)] else 0.0))
    return out


@dataclass
class TextScore:
    """A text's overall score (the sum of its p over heads) and the heads behind it, largest p first."""
    text: str
    score: float
    heads: list[tuple[int, int, float]]


def rank_texts(scores: list[SpanScore]) -> list[TextScore]:
    """Texts ranked by the sum of their p over the heads that picked them, largest first."""
    by_text: dict[str, list[tuple[int, int, float]]] = {}
    for s in scores:
        by_text.setdefault(s.text, []).append((s.layer, s.head, s.score))
    ranked = [TextScore(t, float(sum(p for _, _, p in hs)), sorted(hs, key=lambda x: -x[2]))
              for t, hs in by_text.items()]
    return sorted(ranked, key=lambda r: -r.score)
