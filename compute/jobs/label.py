"""Head property labels that say when they do not know, and per-image property vectors.

Method `tags` (the default), for a pool whose texts carry property tags:
- the candidate is the property carried by most of the head's TextSpan texts (ties go to the earlier pick);
- the head keeps it only if TextSpan on each of two disjoint halves of the images (textspan_heads'
  picks_a, picks_b) gives the same majority; otherwise it is `unlabelled`. A label that flips with
  the sample of images is not evidence about the head;
- confidence = 1 - p, with p the chance that the head's texts, their tags shuffled over the pool
  (NULL_DRAWS permutations, seeded), carry the label's property at least as often: how far the vote
  beats what the pool's own mix of tags gives by chance (a common property needs more votes).
How the vote size (textspan's m) and the gate were chosen, on seeds kept apart from validation:
docs/labels.md.

Other methods:
- `majority`: the candidate above with no gate (the earlier default; confidence is the vote share).
- `similarity`: for untagged pools; each pool text is tagged with the property whose reference
  prototype (mean embedding of a bundled tagged pool's texts of that property) is nearest, then `tags`.
- `llm`: in-context labelling through an OpenAI-compatible chat API, only when
  CLIP_ATLAS_LLM_URL and CLIP_ATLAS_LLM_MODEL are set (key in CLIP_ATLAS_LLM_KEY, never logged).
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.models import load_model
from compute.store.layout import RunStore, vectors, write_table_atomic
from compute.store.readers import iter_chunks, vector_column
from compute.texts import load_pool

UNLABELLED = "unlabelled"
NULL_DRAWS = 2000     # tag permutations for the confidence (p resolves to 1/2001)
NULL_SEED = 0


@dataclass(frozen=True)
class HeadLabel:
    layer: int
    head: int
    property: str
    confidence: float
    method: str
    share: float = 0.0       # share of the head's texts that carry the property (the vote)


def majority(tag_lists: list[list[str]]) -> tuple[str, float]:
    """The tag carried by most lists (ties go to the one seen first, i.e. the earlier TextSpan pick) and its share."""
    if not tag_lists:
        return UNLABELLED, 0.0
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for i, tags in enumerate(tag_lists):
        for t in set(tags):
            counts[t] += 1
            first.setdefault(t, i)
    if not counts:
        return UNLABELLED, 0.0
    best = max(counts, key=lambda t: (counts[t], -first[t]))
    return best, counts[best] / len(tag_lists)


def shuffled_tag_pvalue(tags: list[list[str]], ids: list[int], prop: str, draws: int = NULL_DRAWS,
                        seed: int = NULL_SEED) -> float:
    """P(share of `prop` among the texts `ids` >= observed) when the pool's tags are shuffled over its texts."""
    has = np.array([prop in t for t in tags])
    if not ids or not has.any():
        return 1.0
    observed = has[ids].mean()
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((draws, len(tags))), axis=1)[:, :len(ids)]    # texts drawn without replacement
    null = has[perms].mean(1)
    return float((1 + (null >= observed - 1e-12).sum()) / (draws + 1))


def half_picks(store: RunStore) -> dict[tuple[int, int], tuple[list[int], list[int]]]:
    """(layer, head) -> the TextSpan picks on each half of the images."""
    path = store.table_path("textspan_heads")
    if not path.is_file():
        raise AtlasError(f"{store.root}: no textspan_heads.parquet; rerun `clip-atlas textspan`")
    return {(r["layer"], r["head"]): (r["picks_a"], r["picks_b"])
            for r in pq.read_table(path, columns=["layer", "head", "picks_a", "picks_b"]).to_pylist()}


def stable_labels(store: RunStore, tags: list[list[str]], method: str) -> list[HeadLabel]:
    """Majority of each head's texts, kept when both halves of the images agree; confidence from the shuffled-tag null."""
    halves = half_picks(store)
    out = []
    for (l, h), ids in sorted(head_texts(store).items()):
        prop, share = majority([tags[i] for i in ids])
        a, b = halves.get((l, h), ([], []))
        if prop == UNLABELLED or any(majority([tags[i] for i in half])[0] != prop for half in (a, b)):
            out.append(HeadLabel(l, h, UNLABELLED, 0.0, method, share))
            continue
        out.append(HeadLabel(l, h, prop, 1.0 - shuffled_tag_pvalue(tags, ids, prop), method, share))
    return out


def head_texts(store: RunStore) -> dict[tuple[int, int], list[int]]:
    """(layer, head) -> text ids in pick order."""
    path = store.table_path("textspan")
    if not path.is_file():
        raise AtlasError(f"{store.root}: no textspan.parquet; run `clip-atlas textspan` first")
    t = pq.read_table(path, columns=["layer", "head", "rank", "text_id"]).to_pylist()
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for r in t:
        out.setdefault((r["layer"], r["head"]), []).append((r["rank"], r["text_id"]))
    return {k: [tid for _, tid in sorted(v)] for k, v in out.items()}


def read_texts(store: RunStore) -> tuple[list[str], list[list[str]], np.ndarray]:
    t = pq.read_table(store.table_path("texts"))
    return t.column("text").to_pylist(), t.column("tags").to_pylist(), vector_column(t, "embedding")


def label_by_tags(store: RunStore) -> list[HeadLabel]:
    _, tags, _ = read_texts(store)
    return stable_labels(store, tags, "tags")


def label_by_majority(store: RunStore) -> list[HeadLabel]:
    """Majority tag of the head's TextSpan texts, with no gate."""
    _, tags, _ = read_texts(store)
    out = []
    for (l, h), ids in sorted(head_texts(store).items()):
        prop, share = majority([tags[i] for i in ids])
        out.append(HeadLabel(l, h, prop, share, "majority", share))
    return out


def label_by_similarity(store: RunStore, reference: str = "general") -> list[HeadLabel]:
    """Tags each pool text with its nearest property prototype, then labels as `tags` does."""
    _, _, emb = read_texts(store)
    ref = load_pool(reference)
    if not ref.tagged:
        raise AtlasError(f"reference pool {reference} has no tags")
    loaded = load_model(store.manifest()["model"])
    ref_emb = loaded.encode_texts(ref.texts).cpu().numpy()
    props = sorted({t for tags in ref.tags for t in tags})
    protos = []
    for p in props:
        rows = [i for i, tags in enumerate(ref.tags) if tags == [p]] or [i for i, tags in enumerate(ref.tags) if p in tags]
        v = ref_emb[rows].mean(0)
        protos.append(v / np.linalg.norm(v))
    nearest = np.argmax(emb @ np.stack(protos).T, axis=1)
    return stable_labels(store, [[props[j]] for j in nearest], "similarity")


def label_by_llm(store: RunStore, examples: list[tuple[list[str], str]] | None = None, timeout: float = 60) -> list[HeadLabel]:
    """In-context labelling by a chat model behind an OpenAI-compatible API (configured by environment)."""
    url, model = os.environ.get("CLIP_ATLAS_LLM_URL"), os.environ.get("CLIP_ATLAS_LLM_MODEL")
    if not url or not model:
        raise AtlasError("the llm method needs CLIP_ATLAS_LLM_URL and CLIP_ATLAS_LLM_MODEL (and CLIP_ATLAS_LLM_KEY)")
    key = os.environ.get("CLIP_ATLAS_LLM_KEY", "")
    texts, tags, _ = read_texts(store)
    known = sorted({t for ts in tags for t in ts})
    shots = examples or [(["a red car", "the color blue", "something green"], "colors"),
                         (["a photo taken in Paris", "Tokyo at night", "the Alps"], "locations")]
    system = ("You name the single property that a list of image descriptions has in common. "
              "Answer with one lower-case word or short phrase" + (f", preferably one of: {', '.join(known)}" if known else "") + ".")
    out = []
    for (l, h), ids in sorted(head_texts(store).items()):
        msgs = [{"role": "system", "content": system}]
        for ex, ans in shots:
            msgs += [{"role": "user", "content": "\n".join(ex)}, {"role": "assistant", "content": ans}]
        msgs.append({"role": "user", "content": "\n".join(texts[i] for i in ids)})
        req = urllib.request.Request(url.rstrip("/") + "/chat/completions",
                                     data=json.dumps({"model": model, "messages": msgs, "temperature": 0}).encode(),
                                     headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError) as e:
            raise AtlasError(f"llm labelling failed for layer {l} head {h}: {type(e).__name__}") from None
        prop = " ".join(str(answer).strip().strip(".").lower().split()[:4]) or UNLABELLED
        # confidence: share of the head's texts whose tags agree with the answer (0 for an untagged pool)
        share = sum(prop in tags[i] for i in ids) / len(ids) if known else 0.0
        out.append(HeadLabel(l, h, prop, share, "llm", share))
    return out


METHODS = ("tags", "majority", "similarity", "llm")


def write_labels(store: RunStore, labels: list[HeadLabel]) -> None:
    store.write_derived("properties", pa.table({
        "layer": pa.array([x.layer for x in labels], pa.int16()), "head": pa.array([x.head for x in labels], pa.int16()),
        "property": [x.property for x in labels], "confidence": pa.array([x.confidence for x in labels], pa.float32()),
        "share": pa.array([x.share for x in labels], pa.float32()), "method": [x.method for x in labels]}))


def write_property_vectors(store: RunStore, labels: list[HeadLabel]) -> dict[str, int]:
    """Per image and property, the mean contribution of that property's heads: one folder per property, one part
    file per chunk of the run (streamed: memory is one chunk's rows)."""

    groups: dict[str, list[tuple[int, int]]] = {}
    for x in labels:
        if x.property != UNLABELLED:
            groups.setdefault(x.property, []).append((x.layer, x.head))
    shutil.rmtree(store.root / "property_vectors", ignore_errors=True)
    pairs = sorted({lh for g in groups.values() for lh in g})
    if pairs:
        index = {lh: i for i, lh in enumerate(pairs)}
        for rows in iter_chunks(store, pairs, embedding=False):
            for prop, heads in groups.items():
                mean = rows.heads[[index[lh] for lh in heads]].mean(0)
                write_table_atomic(pa.table({"image_id": pa.array(rows.ids, pa.int64()), "vector": vectors(mean)}),
                                   store.property_dir(prop) / f"part-{rows.key}.parquet")
    return {p: len(v) for p, v in groups.items()}


def run_label(run: str, method: str = "tags", reference: str = "general") -> list[HeadLabel]:
    """`clip-atlas label`: properties.parquet and property_vectors/ (labelled heads only)."""
    if method not in METHODS:
        raise AtlasError(f"unknown labelling method {method!r} ({', '.join(METHODS)})")
    store = RunStore(run)
    store.manifest()
    if not store.table_path("texts").is_file():
        raise AtlasError(f"{store.root} has no TextSpan texts yet: run `clip-atlas textspan {store.root}` first")
    if method == "similarity":
        labels = label_by_similarity(store, reference)
    else:
        labels = {"tags": label_by_tags, "majority": label_by_majority, "llm": label_by_llm}[method](store)
    write_labels(store, labels)
    counts = write_property_vectors(store, labels)
    store.update_manifest(properties={"method": method, "labelled_heads": sum(x.property != UNLABELLED for x in labels),
                                      "heads_per_property": counts})
    return labels
