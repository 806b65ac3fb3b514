"""`clip-atlas textspan RUN`: texts.parquet, textspan.parquet and textspan_heads.parquet.

Each head's stored contributions are streamed part file by part file into float64 moments, split
into two fixed halves of the images (`half_of`), so memory is D x D per head whatever the number of
images. TextSpan runs on the whole set (the stored picks) and on each half (the stability figure).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from compute import checks
from compute.errors import AtlasError
from compute.organisms import is_organism_architecture
from compute.maths.decompose import resolve_layers
from compute.maths.textspan import (PICK_FLOOR, STABILITY_K, UNSTABLE_BELOW, Moments, TextSpanResult, half_of,
                                    pick_overlap, textspan_from_moments)
from compute.models import load_model
from compute.runtime import pick_device
from compute.store.layout import LEGACY_FIELDS, RunStore, stored_head_layers, vectors
from compute.store.readers import iter_head
from compute.texts import load_pool

DEFAULT_M = 10      # chosen on tuning seeds: docs/textspan.md
DEFAULT_RANK = 80


def head_moments(store: RunStore, pairs: list[tuple[int, int]], device: torch.device) -> tuple[Moments, Moments]:
    """Moments of the two halves of the images for each head in `pairs` (stacked in that order)."""
    halves: list[list[Moments]] = [[], []]
    for layer, head in pairs:
        a = b = None
        for ids, C in iter_head(store, layer, head):
            second = half_of(torch.as_tensor(np.array(ids))).to(device)
            rows = torch.from_numpy(np.array(C)).to(device)
            if a is None:
                a, b = Moments.zeros(1, C.shape[1], device), Moments.zeros(1, C.shape[1], device)
            a.add(rows[~second][None])
            b.add(rows[second][None])
        halves[0].append(a)
        halves[1].append(b)
    counts = {(m.n, h.n) for m, h in zip(*halves)}
    if len(counts) != 1:
        raise AtlasError(f"{store.root}: heads hold different images; is the run complete?")
    return tuple(Moments(ms[0].n, torch.cat([m.sum for m in ms]), torch.cat([m.gram for m in ms])) for ms in halves)


def default_pool(architecture: str) -> str:
    """The bundled pool that describes what a model was trained on: Shapes' own vocabulary, else `general`."""
    return "shapes" if is_organism_architecture(architecture) else "general"


def run_textspan(run: str, pool: str = "auto", m: int = DEFAULT_M, rank: int = DEFAULT_RANK, layers: str | None = None,
                 device: str = "auto", heads_per_batch: int = 16, floor: float = PICK_FLOOR,
                 progress: bool = True) -> dict:
    """Writes RUN/texts.parquet, RUN/textspan.parquet (picks) and RUN/textspan_heads.parquet (per-head summary)."""

    store = RunStore(run)
    man = store.require_complete()
    checks.at_least(1, m=m, rank=rank)
    chosen = stored_head_layers(man, None if layers is None else resolve_layers(layers, man["layers"]), run)
    store_dtype = man.get("store_dtype", LEGACY_FIELDS["store_dtype"])
    if pool == "auto":
        pool = default_pool(man.get("architecture", ""))
    texts = load_pool(pool)
    dev = pick_device(device)
    loaded = load_model(man["model"], dev)
    T = loaded.encode_texts(texts.texts, progress=progress)
    store.write_derived("texts", pa.table({
        "text_id": pa.array(range(len(texts.texts)), pa.int32()), "text": texts.texts,
        "tags": pa.array(texts.tags, pa.list_(pa.string())), "embedding": vectors(T.cpu().numpy())}))
    pairs = [(l, h) for l in chosen for h in range(man["heads"])]
    picks: list[Pick] = []
    heads: list[HeadSummary] = []
    bar = tqdm(total=len(pairs), desc="textspan", unit="head", disable=not progress)
    for i in range(0, len(pairs), heads_per_batch):
        group = pairs[i:i + heads_per_batch]
        a, b = head_moments(store, group, dev)
        whole = a + b
        res = textspan_from_moments(whole, T, m=m, rank=rank, floor=floor, store_dtype=store_dtype)
        ra, rb = (textspan_from_moments(x, T, m=m, rank=rank, floor=floor, store_dtype=store_dtype) for x in (a, b))
        _collect(group, res, ra, rb, picks, heads)
        bar.update(len(group))
    bar.close()
    D = T.shape[1]
    store.write_derived("textspan", pa.table({
        "layer": pa.array([p.layer for p in picks], pa.int16()), "head": pa.array([p.head for p in picks], pa.int16()),
        "rank": pa.array([p.rank for p in picks], pa.int16()), "text_id": pa.array([p.text_id for p in picks], pa.int32()),
        "text": [texts.texts[p.text_id] for p in picks],
        "variance_explained": pa.array([p.variance_explained for p in picks], pa.float32()),
        "cumulative_variance": pa.array([p.cumulative_variance for p in picks], pa.float32()),
        "direction": vectors(np.stack([p.direction for p in picks]) if picks else np.zeros((0, D), np.float32))}))
    stab = np.array([h.stability for h in heads])
    store.write_derived("textspan_heads", pa.table({
        "layer": pa.array([h.layer for h in heads], pa.int16()), "head": pa.array([h.head for h in heads], pa.int16()),
        "effective_rank": pa.array([h.effective_rank for h in heads], pa.int16()),
        "picks": pa.array([h.picks for h in heads], pa.int16()),
        "total_variance": pa.array([h.total_variance for h in heads], pa.float64()),
        "explained": pa.array([h.explained for h in heads], pa.float32()),
        "stability": pa.array(stab, pa.float32()), "stable": pa.array(stab >= UNSTABLE_BELOW),
        "picks_a": pa.array([h.picks_a for h in heads], pa.list_(pa.int32())),
        "picks_b": pa.array([h.picks_b for h in heads], pa.list_(pa.int32())),
        "basis": pa.array([h.basis for h in heads], pa.list_(pa.float32())),
        "span_covariance": pa.array([h.span_covariance for h in heads], pa.list_(pa.float64()))}))
    return store.update_manifest(textspan={
        "pool": pool, "texts": len(texts.texts), "m": m, "rank": rank, "floor": floor, "layers": chosen,
        "stability_k": STABILITY_K, "unstable_below": UNSTABLE_BELOW,
        "mean_stability": float(stab.mean()) if len(stab) else float("nan"),
        "unstable_heads": int((stab < UNSTABLE_BELOW).sum())})


@dataclass
class Pick:
    """One row of textspan.parquet: a head's rank-th text."""
    layer: int
    head: int
    rank: int
    text_id: int
    variance_explained: float
    cumulative_variance: float
    direction: np.ndarray


@dataclass
class HeadSummary:
    """One row of textspan_heads.parquet."""
    layer: int
    head: int
    effective_rank: int
    picks: int
    total_variance: float
    explained: float
    stability: float
    picks_a: list[int]
    picks_b: list[int]
    basis: np.ndarray            # [effective_rank * D] the head's orthonormal span, flattened
    span_covariance: np.ndarray  # [effective_rank ** 2] the contributions' covariance in that span, flattened


def _collect(group, res: TextSpanResult, ra: TextSpanResult, rb: TextSpanResult, picks: list[Pick],
             heads: list[HeadSummary]) -> None:
    ve, cum = res.variance_explained.cpu().numpy(), res.cumulative.cpu().numpy()
    d = res.directions.float().cpu().numpy()
    for g, (layer, head) in enumerate(group):
        chosen, pa_, pb_ = res.head_picks(g), ra.head_picks(g), rb.head_picks(g)
        picks += [Pick(layer, head, r, j, float(ve[g, r]), float(cum[g, r]), d[g, r]) for r, j in enumerate(chosen)]
        r = int(res.rank[g])
        heads.append(HeadSummary(
            layer, head, r, len(chosen), float(res.total_variance[g]),
            float(cum[g, len(chosen) - 1]) if chosen else 0.0, pick_overlap(pa_, pb_), pa_, pb_,
            res.basis[g, :r].float().cpu().numpy().reshape(-1), res.span_covariance[g, :r, :r].cpu().numpy().reshape(-1)))
