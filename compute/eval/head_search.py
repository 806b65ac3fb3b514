"""Find the heads that carry a spurious cue from group-labelled images, and test the repair on images the search
never saw (`clip-atlas eval ablation --search`).

Split. The images are split once, seeded and stratified by group, into a selection part (SPLIT of each group) and
a test part. Everything below the report line uses the selection part only.

Score. Mean-ablating head h replaces its direct contribution c_h(x) by its mean mu_h (over the selection part), so
image x's margin (its class's score minus the best other class's, under the model as is) changes by

    delta_h(x) = -(c_h(x) - mu_h) . (t_y(x) - t_o(x))

from the decomposition alone (no extra forward pass). A head's score is mean delta_h over the worst group minus
mean delta_h over the best group (groups ranked by the model's own accuracy on the selection part): how much
ablating it alone narrows the gap between them. Every head of every layer is scored.

Search. Greedy over the CANDIDATES best-scored heads: add the head whose ablation, with those already chosen,
gives the highest worst-group accuracy on the selection part (ties: the higher average), up to MAX_HEADS heads.

How many heads (`stop`). `nested` (the default): the selection part is split again, seeded and stratified by
group, into an inner part (STOP_SPLIT) and a stop part. Scores, candidates and the greedy path to MAX_HEADS are
found on the inner part alone; the number of heads k is the prefix of that path with the highest worst-group
accuracy on the stop part (ties: fewer heads; 0 is allowed); the final heads are then the greedy search on the
whole selection part run for k steps. `gain` (the first rule, kept to reproduce its table): stop when the best
addition lifts worst-group accuracy on the selection part by less than MIN_GAIN. The constants were fixed before
the first run on any data; the nested rule was written down before its first run (docs/reproduce.md).

Report, on the test part only: the model as is, the searched heads, the best (chosen on the test part: the
baseline's most favourable reading) of N random ablations of as many heads drawn from every head, and, given a
labelled run, the paper's property heads and their random baseline; each with bootstrap 95% intervals (BOOT
resamples of the test images within each group) of average and worst-group accuracy.

Where the cue lives. The gap between the worst and the best group in mean margin is a sum over every component
of the decomposition (embedding, each head, each MLP, biases); `shares` says how much of it the heads carry, how
much the MLPs carry (which no head ablation can remove), and which heads carry most.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from compute.eval.ablation import GroupedSet, HeadScores, ablated_scores, accuracy, head_scores
from compute.headnames import head_name
from compute.maths.decompose import component_layout
from compute.models import LoadedModel

SPLIT = 0.5
CANDIDATES = 24
MAX_HEADS = 16
MIN_GAIN = 0.005
STOP_SPLIT = 0.5
STOPS = ("nested", "gain")
BOOT = 1000


def split(groups: np.ndarray, seed: int, share: float = SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """(selection indices, test indices), seeded, the same share of every group in the selection part."""
    rng = np.random.default_rng(seed)
    sel = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        rng.shuffle(idx)
        sel.append(idx[:int(round(share * len(idx)))])
    sel = np.sort(np.concatenate(sel))
    return sel, np.setdiff1d(np.arange(len(groups)), sel)


def margin_directions(base: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[N]: each image's best other class under the model as is."""
    s = base.copy()
    s[np.arange(len(y)), y] = -np.inf
    return s.argmax(1)


def head_gap_scores(hs: HeadScores, idx: np.ndarray, y: np.ndarray, g: np.ndarray, means: np.ndarray,
                    worst: int, best: int) -> np.ndarray:
    """[L, H]: for each head, mean margin change from ablating it alone on the worst group minus on the best."""
    o = margin_directions(hs.base[idx], y)
    centred = hs.heads[idx] - means[None]                              # [n, L, H, C]
    delta = -(np.take_along_axis(centred, y[:, None, None, None], 3)[..., 0]
              - np.take_along_axis(centred, o[:, None, None, None], 3)[..., 0])     # [n, L, H]
    return delta[g == worst].mean(0) - delta[g == best].mean(0)


def greedy(hs: HeadScores, idx: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str], means: np.ndarray,
           order: list[tuple[int, int]], max_heads: int = MAX_HEADS,
           min_gain: float | None = MIN_GAIN) -> tuple[list[tuple[int, int]], list[dict]]:
    """The greedy search over `order` (the candidates), up to `max_heads` heads, stopping early when an addition
    gains less than `min_gain` (None: never); returns the chosen heads in the order chosen and each step's figures."""
    chosen: list[tuple[int, int]] = []
    now = accuracy(ablated_scores(hs, chosen, means, idx), y, g, names)
    steps = [{"heads": [], "worst_group": now["worst_group"], "average": now["average"]}]
    while len(chosen) < max_heads:
        best, best_acc = None, None
        for h in order:
            if h in chosen:
                continue
            acc = accuracy(ablated_scores(hs, chosen + [h], means, idx), y, g, names)
            if best_acc is None or (acc["worst_group"], acc["average"]) > (best_acc["worst_group"], best_acc["average"]):
                best, best_acc = h, acc
        if best is None or (min_gain is not None and best_acc["worst_group"] - now["worst_group"] < min_gain):
            break
        chosen.append(best)
        now = best_acc
        steps.append({"heads": [head_name(*best)], "worst_group": now["worst_group"], "average": now["average"]})
    return chosen, steps


def extremes(hs: HeadScores, idx: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str]) -> tuple[int, int]:
    """(worst group, best group) by the model's own accuracy on `idx`."""
    acc = accuracy(hs.base[idx], y, g, names)
    present = [k for k, n in enumerate(names) if n in acc["groups"]]
    return (min(present, key=lambda k: acc["groups"][names[k]]), max(present, key=lambda k: acc["groups"][names[k]]))


@dataclass
class Candidates:
    """What the scoring of every head on some images gives the greedy search."""
    heads: list[tuple[int, int]]      # the CANDIDATES best heads with a positive score, best first
    scores: np.ndarray                # [L, H] every head's score
    ranked: list[tuple[int, int]]     # every head, best first
    worst: int                        # the worst and best group there, by the model's own accuracy
    best: int


def candidates(hs: HeadScores, idx: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str],
               means: np.ndarray) -> Candidates:
    """Every head scored on the images `idx` (labels y, groups g), and the candidates for the search."""
    worst, best = extremes(hs, idx, y, g, names)
    scores = head_gap_scores(hs, idx, y, g, means, worst, best)
    ranked = [(hs.layers[i // scores.shape[1]], int(i % scores.shape[1])) for i in np.argsort(scores, axis=None)[::-1]]
    heads = [h for h in ranked if scores[hs.layers.index(h[0]), h[1]] > 0][:CANDIDATES]
    return Candidates(heads, scores, ranked, worst, best)


def nested_length(hs: HeadScores, sel: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str],
                  means: np.ndarray, seed: int) -> dict:
    """The nested stopping rule (module docstring): the number of heads, and the path and curve that chose it.
    `sel` indexes the images; y and g are the labels and groups of `sel`'s images."""
    inner, stop = split(g, seed + 1, STOP_SPLIT)                       # positions within sel
    cands = candidates(hs, sel[inner], y[inner], g[inner], names, means)
    path, _ = greedy(hs, sel[inner], y[inner], g[inner], names, means, cands.heads, min_gain=None)
    curve = []
    for k in range(len(path) + 1):
        acc = accuracy(ablated_scores(hs, path[:k], means, sel[stop]), y[stop], g[stop], names)
        curve.append({"heads": k, "worst_group": acc["worst_group"], "average": acc["average"]})
    best = max(curve, key=lambda c: (c["worst_group"], -c["heads"]))
    return {"rule": "nested", "length": best["heads"], "inner_images": int(len(inner)), "stop_images": int(len(stop)),
            "path": [head_name(*h) for h in path], "curve": curve}


def bootstrap(scores: np.ndarray, y: np.ndarray, g: np.ndarray, names: list[str], seed: int) -> dict:
    """95% intervals of average and worst-group accuracy, resampling images within each group."""
    rng = np.random.default_rng(seed)
    correct = scores.argmax(1) == y
    by_group = [np.flatnonzero(g == k) for k in range(len(names)) if (g == k).any()]
    avg, worst = [], []
    for _ in range(BOOT):
        per = [correct[rng.choice(ix, len(ix))].mean() for ix in by_group]
        sizes = [len(ix) for ix in by_group]
        avg.append(float(np.average(per, weights=sizes)))
        worst.append(float(min(per)))
    q = lambda xs: [float(np.quantile(xs, 0.025)), float(np.quantile(xs, 0.975))]
    return {"average": q(avg), "worst_group": q(worst)}


def gap_shares(hs: HeadScores, idx: np.ndarray, y: np.ndarray, g: np.ndarray, worst: int, best: int,
               top: int = 8) -> dict:
    """How the worst-minus-best gap in mean margin splits over the decomposition's components."""
    o = margin_directions(hs.base[idx], y)

    def gap(part: np.ndarray) -> np.ndarray:         # part [n, ..., C] -> its share of the margin gap [...]
        m = (np.take_along_axis(part, y.reshape(-1, *[1] * (part.ndim - 1)), -1)[..., 0]
             - np.take_along_axis(part, o.reshape(-1, *[1] * (part.ndim - 1)), -1)[..., 0])
        return m[g == worst].mean(0) - m[g == best].mean(0)

    total = float(gap(hs.base[idx]))
    heads = gap(hs.heads[idx])                                         # [L, H]
    comps = gap(hs.components[idx]) if hs.components is not None else None   # [K]
    kinds = hs.component_kinds or []
    mlp = float(sum(c for c, k in zip(comps, kinds) if k == "mlp")) if comps is not None else float("nan")
    attn_all = float(sum(c for c, k in zip(comps, kinds) if k == "attn")) if comps is not None else float(heads.sum())
    share = (lambda v: v / total if total else float("nan"))
    order = np.argsort(heads / total if total else np.abs(heads), axis=None)[::-1][:top]
    per_component = []
    if comps is not None:
        _, comp_layers = component_layout(sum(k == "attn" for k in kinds))
        per_component = [{"kind": k, "layer": l, "share": share(float(c))} for k, l, c in zip(kinds, comp_layers, comps)]
    return {"gap": total, "heads": share(attn_all), "stored_heads": share(float(heads.sum())), "mlp": share(mlp),
            "rest": share(total - attn_all - (mlp if mlp == mlp else 0.0)),
            "top_heads": [{"head": head_name(hs.layers[i // heads.shape[1]], i % heads.shape[1]),
                           "share": share(float(heads.flat[i]))} for i in order],
            "components": per_component,
            "every_head": [{"layer": hs.layers[l], "head": h, "share": share(float(heads[l, h]))}
                           for l in range(heads.shape[0]) for h in range(heads.shape[1])]}


def run_search(loaded: LoadedModel, data: GroupedSet, hs: HeadScores | None = None, seed: int = 0,
               random_k: int = 5, property_heads: list[tuple[int, int]] | None = None,
               property_layers: list[int] | None = None, stop: str = "nested", progress: bool = True) -> dict:
    """The search and its held-out report (module docstring); `hs` reuses per-head scores of every layer; `stop`
    is how the number of heads is chosen (STOPS)."""
    if stop not in STOPS:
        raise ValueError(f"unknown stopping rule {stop!r} (use {' or '.join(STOPS)})")
    info = loaded.info
    hs = hs or head_scores(loaded, data, list(range(info.layers)), progress=progress, components=True)
    y_all, g_all = data.labels[hs.kept], data.groups[hs.kept]
    sel, test = split(g_all, seed)
    names = data.group_names
    means = hs.heads[sel].mean(0)                                      # [L, H, C] over the selection part only
    cands = candidates(hs, sel, y_all[sel], g_all[sel], names, means)
    scores, ranked = cands.scores, cands.ranked
    if stop == "nested":
        stopping = nested_length(hs, sel, y_all[sel], g_all[sel], names, means, seed)
        chosen, steps = greedy(hs, sel, y_all[sel], g_all[sel], names, means, cands.heads,
                               max_heads=stopping["length"], min_gain=None)
    else:
        stopping = {"rule": "gain", "min_gain": MIN_GAIN}
        chosen, steps = greedy(hs, sel, y_all[sel], g_all[sel], names, means, cands.heads)
    chosen = sorted(chosen)

    y, g = y_all[test], g_all[test]
    rng = random.Random(seed)
    every = [(l, h) for l in hs.layers for h in range(info.heads)]

    def condition(name: str, heads: list[tuple[int, int]]) -> dict:
        s = ablated_scores(hs, heads, means, test)
        return {"name": name, **accuracy(s, y, g, names), "heads": [list(h) for h in heads],
                "ci": bootstrap(s, y, g, names, seed)}

    def best_random(name: str, k: int, pool: list[tuple[int, int]]) -> tuple[dict, list[dict]]:
        draws = [condition(name, sorted(rng.sample(pool, k))) for _ in range(random_k)]
        return max(draws, key=lambda d: (d["worst_group"], d["average"])), draws

    conditions = [condition("base", [])]
    draws: list[dict] = []
    if property_heads:                  # the paper's baseline: as many heads from the layers the labels covered
        layers = property_layers or sorted({l for l, _ in property_heads})
        r, d = best_random("random", len(property_heads), [(l, h) for l in layers for h in range(info.heads)])
        conditions += [r, condition("property", property_heads)]
        draws += d
    if chosen:                          # the search looked at every head, so its baseline draws from every head
        r, d = best_random("random_searched", len(chosen), every)
        conditions += [r, condition("searched", chosen)]
        draws += d
    else:
        why = ("no head narrowed the gap on the selection part" if stop == "gain"
               else "the stop part was best with no head ablated")
        conditions.append({**condition("searched", []), "note": why})
    return {"model": info.spec, "images": int(len(hs.kept)), "skipped": int(len(data.paths) - len(hs.kept)),
            "classes": data.classes, "group_names": names, "seed": seed, "random_k": random_k,
            "conditions": conditions, "random_draws": draws,
            "search": {"selection_images": int(len(sel)), "test_images": int(len(test)), "split": SPLIT,
                       "candidates": CANDIDATES, "max_heads": MAX_HEADS, "min_gain": MIN_GAIN, "boot": BOOT,
                       "stop": stopping,
                       "worst_group": names[cands.worst], "best_group": names[cands.best], "steps": steps,
                       "heads": [head_name(*h) for h in chosen],
                       "scores": [{"head": head_name(*h), "score": float(scores[hs.layers.index(h[0]), h[1]])}
                                  for h in ranked[:CANDIDATES]]},
            "shares": gap_shares(hs, sel, y_all[sel], g_all[sel], cands.worst, cands.best)}
