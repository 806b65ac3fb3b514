"""Head property labels (from TextSpan texts) and per-image property vectors.

Methods:
- `tags` (default): the property carried by most of the head's top-m texts; confidence is
  the share of those texts carrying it.
- `similarity`: for untagged pools; each of the head's texts goes to the property whose
  tagged reference texts (a bundled pool) its embedding is closest to, then majority as above.
- `llm`: in-context labelling through an OpenAI-compatible chat API, only when
  CLIP_ATLAS_LLM_URL and CLIP_ATLAS_LLM_MODEL are set (key in CLIP_ATLAS_LLM_KEY, never logged).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import AtlasError
from .store import RunStore, vectors, write_table_atomic

UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class HeadLabel:
    layer: int
    head: int
    property: str
    confidence: float
    method: str


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
    from .heads import vector_column
    t = pq.read_table(store.table_path("texts"))
    return t.column("text").to_pylist(), t.column("tags").to_pylist(), vector_column(t, "embedding")


def label_by_tags(store: RunStore) -> list[HeadLabel]:
    _, tags, _ = read_texts(store)
    return [HeadLabel(l, h, *majority([tags[i] for i in ids]), "tags") for (l, h), ids in sorted(head_texts(store).items())]


def label_by_similarity(store: RunStore, reference: str = "general") -> list[HeadLabel]:
    """Nearest property prototype (mean embedding of a tagged pool's single-property texts) for each head text."""
    from .models import load_model
    from .texts import load_pool
    texts, _, emb = read_texts(store)
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
    return [HeadLabel(l, h, *majority([[props[nearest[i]]] for i in ids]), "similarity")
            for (l, h), ids in sorted(head_texts(store).items())]


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
        out.append(HeadLabel(l, h, prop, share, "llm"))
    return out


METHODS = {"tags": label_by_tags, "similarity": label_by_similarity, "llm": label_by_llm}


def write_labels(store: RunStore, labels: list[HeadLabel]) -> None:
    store.write_derived("properties", pa.table({
        "layer": pa.array([x.layer for x in labels], pa.int16()), "head": pa.array([x.head for x in labels], pa.int16()),
        "property": [x.property for x in labels], "confidence": pa.array([x.confidence for x in labels], pa.float32()),
        "method": [x.method for x in labels]}))


def write_property_vectors(store: RunStore, labels: list[HeadLabel]) -> dict[str, int]:
    """Per image and property, the mean contribution of that property's heads; one folder per property."""
    import shutil

    from .heads import read_heads
    groups: dict[str, list[tuple[int, int]]] = {}
    for x in labels:
        if x.property != UNLABELLED:
            groups.setdefault(x.property, []).append((x.layer, x.head))
    shutil.rmtree(store.root / "property_vectors", ignore_errors=True)
    for prop, pairs in groups.items():
        ids, C = read_heads(store, pairs)
        write_table_atomic(pa.table({"image_id": pa.array(ids, pa.int64()), "vector": vectors(C.mean(0))}),
                           store.property_dir(prop) / "part-0.parquet")
    return {p: len(v) for p, v in groups.items()}


def run_label(run: str, method: str = "tags", reference: str = "general") -> list[HeadLabel]:
    """`clip-atlas label`: properties.parquet and property_vectors/."""
    if method not in METHODS:
        raise AtlasError(f"unknown labelling method {method!r} (tags, similarity, llm)")
    store = RunStore(run)
    labels = label_by_similarity(store, reference) if method == "similarity" else METHODS[method](store)
    write_labels(store, labels)
    counts = write_property_vectors(store, labels)
    store.update_manifest(properties={"method": method, "heads_per_property": counts})
    return labels
