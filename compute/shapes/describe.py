"""Image descriptions against Shapes ground truth: are the texts `Run.describe` ranks first true of the image?

For each evaluated scene (the first `n_images` by image_id), its description (maths/describe.py: each head's
centred contribution projected on the head's TextSpan directions, texts ranked by the sum over heads) is
cut to its first k texts that name an attribute value ("a red object" -> color = red). precision@k is the
share of those texts whose value the scene has (on any object, or as its background); chance is, for the
same texts, the share of all evaluated scenes that have their value: what they would score on a random
image. Both are averaged over the scenes. The description has no setting to tune, and the margin the tests
ask for was fixed before any figure was looked at.
"""
from __future__ import annotations

import numpy as np

from compute.errors import AtlasError
from compute.maths.describe import rank_texts, span_scores
from compute.shapes.neurons import scene_has, scenes_by_id, shapes_tags, text_value
from compute.store.layout import RunStore
from compute.store.query import Store
from compute.store.readers import head_files, read_rows

K = 3
N_IMAGES = 300


def evaluate_descriptions(run: str, k: int = K, n_images: int = N_IMAGES) -> dict[str, float]:
    """{describe_precision_at_k, describe_chance_at_k, describe_images} for a Shapes run with TextSpan."""
    store = RunStore(run)
    s = Store(store.root.parent)
    info = s.run(store.root.name)
    picks = s.textspan_directions(info)
    if not picks:
        raise AtlasError(f"{run} has no TextSpan texts; run `clip-atlas textspan {run}` first")
    heads = sorted({(l, h) for l, h, *_ in picks})
    scene_of = scenes_by_id(store)
    ids = np.array([i for i, sc in sorted(scene_of.items()) if sc is not None][:n_images], np.int64)
    if not len(ids):
        raise AtlasError(f"{run}: its images are not Shapes scenes (no scenes.parquet rows)")
    rows = {lh: read_rows(head_files(store, *lh), "contribution", ids) for lh in heads}     # row-filtered reads
    means = s.head_means(info)
    scenes = [scene_of[int(i)] for i in ids]
    tags = shapes_tags()
    base_rate: dict[tuple[str, str], float] = {}
    precision, chance = [], []
    for r, scene in enumerate(scenes):
        ranked = rank_texts(span_scores({lh: m[r] for lh, m in rows.items()}, means, picks))
        values = [v for v in (text_value(t.text, tags.get(t.text)) for t in ranked) if v is not None][:k]
        if not values:
            continue
        for v in values:
            if v not in base_rate:
                base_rate[v] = float(np.mean([scene_has(x, *v) for x in scenes]))
        precision.append(np.mean([scene_has(scene, *v) for v in values]))
        chance.append(np.mean([base_rate[v] for v in values]))
    return {f"describe_precision_at_{k}": float(np.mean(precision)) if precision else float("nan"),
            f"describe_chance_at_{k}": float(np.mean(chance)) if chance else float("nan"),
            "describe_images": float(len(precision))}
