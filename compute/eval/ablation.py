"""`clip-atlas eval ablation`: zero-shot classification of a group-annotated set with heads mean-ablated.

Mean-ablating head (l, h) replaces its direct contribution c_lh(x) to the embedding by its mean over a
set of images, mu_lh. The embedding is linear in the contributions, e' = e - c_lh(x) + mu_lh, and the
predicted class argmax_k e' . t_k does not depend on the norm of e', so each condition's scores are

    s_k(x) = e(x) . t_k - sum over ablated heads of (c_lh(x) - mu_lh) . t_k

computed from the per-head scores c_lh(x) . t_k [N, layers, heads, classes]: one decomposition pass
serves every condition, and memory is classes-wide, not D-wide. As in the paper, only direct effects
are ablated: what a head writes that later layers read is left alone.

Conditions: `base` (the model as is); `property` (the heads of a property in a run's labels, or an
explicit list); `random` (the best, by worst-group accuracy, of K draws of as many heads, uniformly
without replacement from every head of the layers the property's heads were chosen from: the run's
TextSpan layers, or the layers of an explicit list). The mean is over the evaluated images (the
paper's choice) or over a run's stored contributions (`mean_from="run"`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compute import checks
from compute.csvfiles import read_csv_rows
from compute.errors import AtlasError
from compute.maths.decompose import component_layout
from compute.headnames import parse_heads
from compute.images import BadImage, load_image
from compute.models import LoadedModel
from compute.store.layout import RunStore
from compute.store.query import Store
from compute.store.readers import head_means


@dataclass
class GroupedSet:
    paths: list[Path]
    labels: np.ndarray        # class index per image
    groups: np.ndarray        # group index per image
    classes: list[str]
    prompts: list[str]
    group_names: list[str]


def read_grouped_set(images: str | Path, groups_csv: str | Path, classes_csv: str | Path) -> GroupedSet:
    """Images listed in a path,label,group CSV (paths relative to `images`), classes from a label,prompt CSV."""
    images = Path(images)
    if not images.is_dir():
        raise AtlasError(f"image folder not found: {images}")
    cls_rows = read_csv_rows(classes_csv, ("label", "prompt"), "classes")
    classes = [r["label"] for r in cls_rows]
    if len(set(classes)) != len(classes):
        raise AtlasError(f"classes file {classes_csv} lists a label twice")
    rows = read_csv_rows(groups_csv, ("path", "label", "group"), "groups")
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise AtlasError(f"labels {', '.join(unknown[:3])} in {groups_csv} are not in {classes_csv}")
    group_names = sorted({r["group"] for r in rows})
    return GroupedSet([images / r["path"] for r in rows], np.array([classes.index(r["label"]) for r in rows]),
                      np.array([group_names.index(r["group"]) for r in rows]), classes,
                      [r["prompt"] for r in cls_rows], group_names)





@dataclass
class HeadScores:
    """What every condition needs: base scores [N, C] and per-head scores [N, len(layers), H, C]."""
    base: np.ndarray
    heads: np.ndarray
    layers: list[int]
    kept: np.ndarray          # indices into the set of the images that decoded
    texts: torch.Tensor       # [C, D] the class prompts' embeddings (float64)
    components: np.ndarray | None = None     # [N, K, C] every component's scores (component_layout order)
    component_kinds: list[str] | None = None


@torch.no_grad()
def head_scores(loaded: LoadedModel, data: GroupedSet, layers: list[int], batch_size: int = 64,
                progress: bool = True, components: bool = False) -> HeadScores:
    texts = loaded.encode_texts(data.prompts).double()                  # [C, D]
    dec = loaded.decomposer(head_layers=tuple(layers))
    base, heads, kept, comps = [], [], [], []
    bar = tqdm(total=len(data.paths), desc="classify", unit="img", disable=not progress)
    for i in range(0, len(data.paths), batch_size):
        pix = []
        for j in range(i, min(i + batch_size, len(data.paths))):
            try:
                pix.append(loaded.preprocess(load_image(data.paths[j])))
                kept.append(j)
            except BadImage:
                pass
        bar.update(min(batch_size, len(data.paths) - i))
        if not pix:
            continue
        d = dec(torch.stack(pix).to(loaded.device))
        base.append((d.embedding.double() @ texts.T.to(d.embedding.device)).cpu().numpy())
        heads.append((d.heads.double() @ texts.T.to(d.heads.device)).cpu().numpy())
        if components:
            comps.append((d.components().double() @ texts.T.to(d.heads.device)).cpu().numpy())
    bar.close()
    if not kept:
        raise AtlasError("none of the listed images could be decoded")
    kinds = component_layout(loaded.info.layers)[0] if components else None
    return HeadScores(np.concatenate(base), np.concatenate(heads), layers, np.array(kept), texts,
                      np.concatenate(comps) if components else None, kinds)


def accuracy(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, group_names: list[str]) -> dict:
    """Average accuracy over images, worst-group accuracy (minimum over the groups present) and each group's."""
    correct = scores.argmax(1) == labels
    per = {g: float(correct[groups == i].mean()) for i, g in enumerate(group_names) if (groups == i).any()}
    return {"average": float(correct.mean()), "worst_group": min(per.values()), "groups": per}


def looks_like_heads(text: str) -> bool:
    """A list of heads (L10.H3,11.7), not a property's name."""
    return all(ch.isdigit() or ch in ".,- lLhH" for ch in text) and any(ch.isdigit() for ch in text)


def mean_ablate(total: np.ndarray, parts: np.ndarray, means: np.ndarray) -> np.ndarray:
    """`total` [N, ...] with each of the parts [K, N, ...] replaced by its mean [K, ...]: total - sum_k (part_k -
    mean_k). The one mean ablation: of embeddings (D-wide) or of their scores on texts (classes-wide) alike."""
    return total - (parts - means[:, None]).sum(0)


def ablated_scores(hs: HeadScores, heads: list[tuple[int, int]], means: np.ndarray,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """Base scores with each listed head's score replaced by its mean score; means is [len(layers), H, C];
    `rows` restricts to some images (a selection or test part)."""
    rows = slice(None) if rows is None else rows
    idx = [(hs.layers.index(layer), h) for layer, h in heads]
    if not idx:
        return hs.base[rows].copy()
    parts = np.stack([hs.heads[rows, li, h] for li, h in idx])
    return mean_ablate(hs.base[rows], parts, np.stack([means[li, h] for li, h in idx]))


def run_means(run: str | Path, layers: list[int], n_heads: int, texts: torch.Tensor) -> np.ndarray:
    """Mean head contributions over a run's images, projected on the class texts: [len(layers), H, C]."""
    store = RunStore(run)
    stored = store.manifest().get("head_layers", [])
    missing = sorted(set(layers) - set(stored))
    if missing:
        raise AtlasError(f"{run} stores no heads of layer {missing[0]}; recompute it with --layers including it")
    T = texts.double().cpu().numpy().T
    means = head_means(store, [(layer, h) for layer in layers for h in range(n_heads)])
    return (means @ T).reshape(len(layers), n_heads, T.shape[1])


def property_heads(run: str | Path, prop: str) -> tuple[list[tuple[int, int]], list[int]]:
    """(the heads a run labels `prop`, the layers its labels were chosen among)."""
    run = Path(run).resolve()
    store = Store(run.parent)
    info = store.run(run.name)
    heads = store.heads_with_property(info, prop, required=True)
    layers = info.manifest.get("textspan", {}).get("layers") or sorted({r.layer for r in store.properties(info)})
    return heads, sorted(layers)


def _resolve_ablate(loaded: LoadedModel, ablate: str, run: str | None) -> tuple[list[tuple[int, int]], list[int]]:
    """(heads, the layers they were chosen among) from --ablate: a list of heads, or a property of --run."""
    info = loaded.info
    if looks_like_heads(ablate):
        heads = parse_heads(ablate, info.layers, info.heads)
        return heads, sorted({lh[0] for lh in heads})
    if run is None:
        raise AtlasError(f"--ablate {ablate} names a property: pass --run with the labelled run")
    return property_heads(run, ablate)


def ablation_heads(loaded: LoadedModel, ablate: str, run: str | None) -> list[tuple[int, int]]:
    return _resolve_ablate(loaded, ablate, run)[0]


def run_ablation(loaded: LoadedModel, data: GroupedSet, ablate: str | None = None, run: str | None = None,
                 random_k: int = 5, seed: int = 0, mean_from: str = "eval", progress: bool = True) -> dict:
    """The JSON report: {"conditions": [{"name", "average", "worst_group", "heads", "groups"}, ...], ...}."""
    info = loaded.info
    checks.one_of("mean_from", mean_from, ("eval", "run"))
    if run is not None:
        if not RunStore(run).exists():
            raise AtlasError(f"no run at {run}")
        run_model = RunStore(run).manifest().get("model")
        if run_model != info.spec:
            raise AtlasError(f"{run} was computed with {run_model}, not {info.spec}: its labels describe another model")
    heads, layers = [], []
    if ablate:
        heads, layers = _resolve_ablate(loaded, ablate, run)
    if mean_from == "run" and run is None:
        raise AtlasError("--mean-from run needs --run")
    hs = head_scores(loaded, data, layers, progress=progress)
    y, g = data.labels[hs.kept], data.groups[hs.kept]
    conditions = [{"name": "base", **accuracy(hs.base, y, g, data.group_names), "heads": []}]
    draws = []
    if heads:
        means = (run_means(run, layers, info.heads, hs.texts) if mean_from == "run"
                 else hs.heads.mean(0))
        rng = random.Random(seed)
        pool = [(layer, h) for layer in layers for h in range(info.heads)]
        for _ in range(random_k):
            pick = sorted(rng.sample(pool, len(heads)))
            draws.append({**accuracy(ablated_scores(hs, pick, means), y, g, data.group_names), "heads": pick})
        if draws:
            best = max(draws, key=lambda d: (d["worst_group"], d["average"]))
            conditions.append({"name": "random", **best})
        conditions.append({"name": "property", **accuracy(ablated_scores(hs, heads, means), y, g, data.group_names),
                           "heads": heads})
    for c in conditions + draws:
        c["heads"] = [list(lh) for lh in c["heads"]]
    return {"model": info.spec, "images": int(len(hs.kept)), "skipped": int(len(data.paths) - len(hs.kept)),
            "classes": data.classes, "group_names": data.group_names, "ablate": ablate, "run": run,
            "mean_from": mean_from, "random_k": random_k, "seed": seed, "conditions": conditions,
            "random_draws": draws}


def format_report(report: dict) -> str:
    lines = [f"{'condition':16s} {'heads':>5s} {'average':>8s} {'worst group':>12s}  (95% interval)"]
    for c in report["conditions"]:
        ci = c.get("ci", {}).get("worst_group")
        interval = f"  [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else ""
        lines.append(f"{c['name']:16s} {len(c['heads']):5d} {100 * c['average']:8.1f} {100 * c['worst_group']:12.1f}"
                     + interval)
    if "search" in report:
        s, sh = report["search"], report["shares"]
        lines.append(f"searched on {s['selection_images']} images, reported on the other {s['test_images']}: "
                     f"{', '.join(s['heads']) or 'no head'}")
        lines.append(f"the {s['worst_group']} vs {s['best_group']} margin gap: heads carry {100 * sh['heads']:.0f}%, "
                     f"MLPs {100 * sh['mlp']:.0f}%, the rest {100 * sh['rest']:.0f}%")
    return "\n".join(lines)
