"""`clip-atlas shapes eval RUN`: which heads carry which attribute, and where the objects are, against ground truth.

Per head and attribute: precision@8 of the head's nearest neighbours (dot product of centred
contributions) sharing the query's value, over one-object scenes, against its chance level
(the probability that a random other scene shares the value). The lift
(p@8 - chance) / (1 - chance) is 0 at chance and 1 when every neighbour agrees.
A head is specialised in an attribute when its neighbourhoods are organised by that attribute
clearly more than by any other: its best lift is at least SPECIALISED_MARGIN times its second
best, and at least SPECIALISED_LIFT (a quarter of the way from chance to perfect), so that a head
near chance on every attribute does not count.

Segmentation: for each object, the all-heads token map of "a <colour> <shape>" thresholded at
its mean, IoU with the object's true mask.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from compute.errors import AtlasError
from compute.maths.segment import heatmap, iou_at_mean, upsample
from compute.models import load_model
from compute.shapes.dataset import load_scenes
from compute.shapes.describe import evaluate_descriptions
from compute.shapes.neurons import evaluate_neurons
from compute.shapes.world import ATTRIBUTES
from compute.store.layout import RunStore
from compute.store.readers import head_files, read_images, read_rows

SPECIALISED_LIFT = 0.25
SPECIALISED_MARGIN = 2.0
K = 8
#: Nearest-neighbour scores use at most this many one-object scenes (the first by image_id, a hash: a fixed
#: random sample), so memory and time do not grow with the run; runs of up to ~5,000 scenes use them all.
MAX_EVAL_SCENES = 4000


def precision_at_k(C: np.ndarray, values: np.ndarray, k: int = K) -> float:
    """Mean share of each row's k nearest rows (dot product of centred rows, self excluded) with the same value."""
    X = C - C.mean(0, keepdims=True)
    sims = X @ X.T
    np.fill_diagonal(sims, -np.inf)
    nn = np.argpartition(-sims, k, axis=1)[:, :k]
    return float((values[nn] == values[:, None]).mean())


def chance_level(values: np.ndarray) -> float:
    """Probability that another random row shares the value (without replacement)."""
    _, counts = np.unique(values, return_counts=True)
    n = len(values)
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def specialisation(lifts: dict[str, float]) -> str | None:
    ranked = sorted(lifts.items(), key=lambda kv: -kv[1])
    (best, top), second = ranked[0], (ranked[1][1] if len(ranked) > 1 else 0.0)
    if top >= SPECIALISED_LIFT and top >= SPECIALISED_MARGIN * max(second, 0.0):
        return best
    return None


def one_to_one(rows: list[dict]) -> float:
    """How cleanly each attribute maps to one head: per attribute, the best head's lift for it minus that head's best
    lift for any other attribute (clipped at 0), averaged over attributes. `rows`: evaluate_heads' rows."""
    lifts: dict[tuple[int, int], dict[str, float]] = {}
    for r in rows:
        lifts.setdefault((r["layer"], r["head"]), {})[r["attribute"]] = r["lift"]
    attrs = sorted({r["attribute"] for r in rows})
    best = {a: max(max(0.0, h[a] - max(v for b, v in h.items() if b != a)) for h in lifts.values()) for a in attrs}
    return float(np.mean(list(best.values())))


def scene_table(store: RunStore) -> tuple[np.ndarray, list[dict], np.ndarray, np.ndarray]:
    """(image_ids, scene records, masks, scene row of each image) for the run's images, sorted by image_id."""
    man = store.manifest()
    scenes, masks = load_scenes(man["images_root"])
    row_of = {s["path"]: i for i, s in enumerate(scenes)}
    images = read_images(store, columns=["image_id", "path"])
    ids = images.column("image_id").to_numpy()
    paths = images.column("path").to_pylist()
    missing = [p for p in paths if p not in row_of]
    if missing:
        raise AtlasError(f"{store.root}: {len(missing)} images are not in the Shapes dataset's scenes.parquet")
    return ids, scenes, masks, np.array([row_of[p] for p in paths])


def single_object_values(scenes: list[dict], rows: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(mask of the one-object scenes among `rows` that are scored, attribute -> the value of each such scene);
    at most MAX_EVAL_SCENES of them, the first in `rows`' order (image_id order)."""
    single = np.array([scenes[r]["n_objects"] == 1 for r in rows])
    single &= np.cumsum(single) <= MAX_EVAL_SCENES
    values = {a: np.array([scenes[r]["background"] if a == "background" else scenes[r][f"obj1_{a}"] for r in rows])[single]
              for a in ATTRIBUTES}
    return single, values


def evaluate_heads(store: RunStore, progress: bool = True) -> pa.Table:
    man = store.manifest()
    ids, scenes, _, rows = scene_table(store)
    single, values = single_object_values(scenes, rows)
    if single.sum() < 4 * K:
        raise AtlasError(f"{store.root}: too few one-object scenes ({single.sum()}) to evaluate heads")
    chance = {a: chance_level(v) for a, v in values.items()}
    out: dict[str, list] = {k: [] for k in ("layer", "head", "attribute", "precision_at_8", "chance", "lift", "specialised")}
    pairs = [(l, h) for l in man["head_layers"] for h in range(man["heads"])]
    for layer, head in tqdm(pairs, desc="ground truth", unit="head", disable=not progress):
        C = read_rows(head_files(store, layer, head), "contribution", ids[single])
        lifts = {}
        for a, v in values.items():
            p = precision_at_k(C, v)
            lifts[a] = (p - chance[a]) / (1 - chance[a])
            out["precision_at_8"].append(p)
        spec = specialisation(lifts)
        for a in ATTRIBUTES:
            out["layer"].append(layer)
            out["head"].append(head)
            out["attribute"].append(a)
            out["chance"].append(chance[a])
            out["lift"].append(lifts[a])
            out["specialised"].append(spec == a)
    return pa.table({"layer": pa.array(out["layer"], pa.int16()), "head": pa.array(out["head"], pa.int16()),
                     "attribute": out["attribute"], "precision_at_8": out["precision_at_8"], "chance": out["chance"],
                     "lift": out["lift"], "specialised": out["specialised"]})


def evaluate_segmentation(store: RunStore, n_images: int = 120, seed: int = 0, progress: bool = True) -> pa.Table:

    man = store.manifest()
    ids, scenes, masks, rows = scene_table(store)
    paths = read_images(store, columns=["image_id", "path"]).column("path").to_pylist()
    loaded = load_model(man["model"])
    pick = random.Random(seed).sample(range(len(ids)), min(n_images, len(ids)))
    out: dict[str, list] = {k: [] for k in ("image_id", "object", "text", "iou", "iou_shuffled")}
    shuffle = np.random.default_rng(seed)
    text_emb: dict[str, torch.Tensor] = {}
    for i in tqdm(pick, desc="segmentation", unit="img", disable=not progress):
        scene = scenes[rows[i]]
        image = Image.open(Path(man["images_root"]) / paths[i]).convert("RGB")
        maps = loaded.token_maps(image)
        for o in range(scene["n_objects"]):
            text = f"a {scene[f'obj{o + 1}_color']} {scene[f'obj{o + 1}_shape']}"
            if text not in text_emb:
                text_emb[text] = loaded.encode_texts([text])[0]
            emb = text_emb[text]
            grid = heatmap(maps, emb)
            truth = masks[rows[i]] == o + 1
            # the same values with the patches shuffled: what a map that ignores the object scores
            shuffled = shuffle.permutation(grid.reshape(-1)).reshape(grid.shape)
            out["image_id"].append(int(ids[i]))
            out["object"].append(o + 1)
            out["text"].append(text)
            out["iou"].append(iou_at_mean(upsample(grid, truth.shape), truth))
            out["iou_shuffled"].append(iou_at_mean(upsample(shuffled, truth.shape), truth))
    return pa.table({"image_id": pa.array(out["image_id"], pa.int64()), "object": pa.array(out["object"], pa.int8()),
                     "text": out["text"], "iou": out["iou"], "iou_shuffled": out["iou_shuffled"]})


def label_agreement(truth_rows: list[dict], store: RunStore) -> dict[str, float]:
    """Share of the clearly specialised heads whose property label names the attribute they specialise in."""
    labels = {(r["layer"], r["head"]): r["property"] for r in pq.read_table(store.table_path("properties")).to_pylist()}
    special = [(r["layer"], r["head"], r["attribute"]) for r in truth_rows if r["specialised"]]
    hits = [labels.get((l, h)) == a for l, h, a in special]
    return {"label_agreement": float(np.mean(hits)) if hits else float("nan"), "label_agreement_heads": float(len(hits))}


@torch.no_grad()
def evaluate_run(run: str, progress: bool = True) -> dict:
    """Writes shapes_heads, shapes_models and shapes_segmentation tables; returns the per-model summary."""
    store = RunStore(run)
    man = store.require_complete()
    heads = evaluate_heads(store, progress)
    seg = evaluate_segmentation(store, progress=progress)
    store.write_derived("shapes_heads", heads)
    store.write_derived("shapes_segmentation", seg)
    rows = heads.to_pylist()
    last2 = set(sorted(man["head_layers"])[-2:])
    n_last2 = len({(r["layer"], r["head"]) for r in rows if r["layer"] in last2})
    summary = {f"specialised_{a}": sum(r["specialised"] for r in rows if r["attribute"] == a) for a in ATTRIBUTES}
    summary["specialised_heads"] = sum(r["specialised"] for r in rows)
    summary["specialised_share"] = summary["specialised_heads"] / max(1, len({(r["layer"], r["head"]) for r in rows}))
    summary["one_to_one"] = one_to_one(rows)
    summary["specialised_share_last2"] = sum(r["specialised"] for r in rows if r["layer"] in last2) / max(1, n_last2)
    summary["segmentation_miou"] = float(np.mean(seg.column("iou").to_numpy())) if seg.num_rows else float("nan")
    summary["segmentation_miou_shuffled"] = float(np.mean(seg.column("iou_shuffled").to_numpy())) if seg.num_rows else float("nan")
    if store.table_path("properties").is_file():
        summary.update(label_agreement(rows, store))
    if store.table_path("textspan").is_file():
        summary.update(evaluate_descriptions(run))
    if any((store.root / "neurons").glob("layer=*.parquet")):
        table, neurons = evaluate_neurons(run)
        store.write_derived("shapes_neurons", table)
        summary.update({f"neuron_{k}": v for k, v in neurons.items() if not isinstance(v, list)})
    store.write_derived("shapes_models", pa.table({"metric": list(summary), "value": [float(v) for v in summary.values()]}))
    store.update_manifest(shapes_eval=summary)
    return summary
