"""Interpretability metrics of a run, and the leaderboard over runs. Definitions: docs/metrics.md."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import AtlasError
from .properties import UNLABELLED, HeadLabel
from .store import RunStore, list_runs


def association(labels: list[HeadLabel]) -> float:
    """Mean over labelled heads of the share of its top-m texts carrying its property (higher: more consistent)."""
    shares = [x.share for x in labels if x.property != UNLABELLED]
    return float(np.mean(shares)) if shares else float("nan")


def entanglement(labels: list[HeadLabel]) -> float:
    """Mean over labelled heads of the fraction of the other labelled heads sharing its property (lower: more distinct)."""
    props = [x.property for x in labels if x.property != UNLABELLED]
    if len(props) < 2:
        return float("nan")
    counts = Counter(props)
    return float(np.mean([(counts[p] - 1) / (len(props) - 1) for p in props]))


def ablation_cosine(embeddings: np.ndarray, part: np.ndarray) -> float:
    """Mean cosine between each embedding and the one where `part` [N, D] is replaced by its mean over images."""
    ablated = embeddings - part + part.mean(0, keepdims=True)
    num = (embeddings * ablated).sum(1)
    den = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(ablated, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def zero_shot_accuracy(embeddings: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(embeddings @ class_emb.T, 1) == labels))


def textspan_reconstruction(C: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """[H, N, D] contributions, [H, m, D] orthonormal TextSpan directions -> reconstructions (mean + span part)."""
    mean = C.mean(1, keepdims=True)
    C0 = C - mean
    return mean + np.einsum("hnd,hmd,hme->hne", C0, directions, directions)


def _rows(run: str, model: str) -> tuple[dict[str, list], Callable[..., None]]:
    rows: dict[str, list] = {k: [] for k in ("run", "model", "scope", "layer", "head", "metric", "value")}

    def add(scope: str, metric: str, value: float, layer: int | None = None, head: int | None = None) -> None:
        for k, v in zip(rows, (run, model, scope, layer, head, metric, float(value))):
            rows[k].append(v)
    return rows, add


def run_metrics(run: str, progress: bool = True) -> pa.Table:
    """`clip-atlas metrics`: RUN/metrics.parquet with model-, layer- and head-scope rows."""
    from .heads import read_components, read_heads, read_images, vector_column
    store = RunStore(run)
    man = store.manifest()
    if man.get("status") != "complete":
        raise AtlasError(f"{run} is {man.get('status')}; finish it with `clip-atlas compute` first")
    rows, add = _rows(store.root.name, man["model"])
    images = read_images(store)
    emb = vector_column(images, "embedding")
    ids, kinds, layers, comps = read_components(store)
    labels_col = images.column("label").to_pylist()
    zs = _zero_shot_setup(man["model"], labels_col) if any(labels_col) else None
    if zs:
        base_acc = zero_shot_accuracy(emb, zs[0], zs[1])
        add("model", "zero_shot_accuracy", base_acc)
    for kind in ("attn", "mlp"):
        for k, (kd, layer) in enumerate(zip(kinds, layers)):
            if kd != kind:
                continue
            add("layer", f"ablation_cosine_{kind}", ablation_cosine(emb, comps[:, k]), layer)
            if zs:
                ablated = emb - comps[:, k] + comps[:, k].mean(0, keepdims=True)
                add("layer", f"ablation_zero_shot_{kind}", zero_shot_accuracy(ablated, zs[0], zs[1]), layer)
    # TextSpan and labels, when present
    ts_path, pr_path = store.table_path("textspan"), store.table_path("properties")
    if ts_path.is_file():
        ts = pq.read_table(ts_path)
        ts = ts.take(pc.sort_indices(ts, [("layer", "ascending"), ("head", "ascending"), ("rank", "ascending")]))
        m = int(pc.max(ts.column("rank")).as_py()) + 1
        last = ts.filter(pc.equal(ts.column("rank"), m - 1)).to_pylist()
        for r in last:
            add("head", "variance_explained", r["cumulative_variance"], r["layer"], r["head"])
        add("model", "variance_explained", np.mean([r["cumulative_variance"] for r in last]))
        pairs = [(r["layer"], r["head"]) for r in last]
        dirs = vector_column(ts, "direction").reshape(len(pairs), m, -1)
        _, C = read_heads(store, pairs)
        recon = textspan_reconstruction(C, dirs)
        swapped = emb - C.sum(0) + recon.sum(0)
        cos = (emb * swapped).sum(1) / np.maximum(np.linalg.norm(emb, axis=1) * np.linalg.norm(swapped, axis=1), 1e-12)
        add("model", "textspan_reconstruction_cosine", cos.mean())
        if zs:
            add("model", "textspan_reconstruction_zero_shot", zero_shot_accuracy(swapped, zs[0], zs[1]))
    if pr_path.is_file():
        labels = [HeadLabel(**{k: r[k] for k in ("layer", "head", "property", "confidence", "method", "share") if k in r})
                  for r in pq.read_table(pr_path).to_pylist()]
        add("model", "association", association(labels))
        add("model", "entanglement", entanglement(labels))
        add("model", "properties", len({x.property for x in labels if x.property != UNLABELLED}))
        add("model", "labelled_heads", sum(x.property != UNLABELLED for x in labels))
        for x in labels:
            add("head", "property_confidence", x.confidence, x.layer, x.head)
    table = pa.table({"run": rows["run"], "model": rows["model"], "scope": rows["scope"],
                      "layer": pa.array(rows["layer"], pa.int16()), "head": pa.array(rows["head"], pa.int16()),
                      "metric": rows["metric"], "value": pa.array(rows["value"], pa.float64())})
    store.write_derived("metrics", table)
    return table


def _zero_shot_setup(model: str, labels: list[str | None]):
    """Class-name embeddings and integer labels, for the images that have a label."""
    from .models import load_model
    names = sorted({l for l in labels if l})
    if len(names) < 2 or len(names) > 1000:
        return None
    loaded = load_model(model)
    class_emb = loaded.encode_texts([f"a photo of a {n}." for n in names]).cpu().numpy()
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(l, -1) for l in labels])
    return class_emb, y


LEADERBOARD_SQL = """
SELECT run, model, metric, value
FROM read_parquet(?, union_by_name = true)
WHERE scope = 'model'
ORDER BY run, metric
"""


def leaderboard(store: str | Path = "artifacts") -> tuple[list[str], list[dict]]:
    """(metric names, one row per run) from every RUN/metrics.parquet under the store, in one DuckDB query."""
    import duckdb
    runs = [r for r in list_runs(store) if (r / "metrics.parquet").is_file()]
    if not runs:
        raise AtlasError(f"no runs with metrics under {store}; run `clip-atlas metrics RUN` first")
    con = duckdb.connect()
    rows = con.execute(LEADERBOARD_SQL, [[str(r / "metrics.parquet") for r in runs]]).fetchall()
    table: dict[str, dict] = {}
    metrics: list[str] = []
    for run, model, metric, value in rows:
        table.setdefault(run, {"run": run, "model": model})[metric] = value
        if metric not in metrics:
            metrics.append(metric)
    return metrics, list(table.values())


def format_leaderboard(metrics: list[str], rows: list[dict]) -> str:
    cols = ["run", "model"] + metrics
    cells = [[str(r.get(c, "")) if c in ("run", "model") else (f"{r[c]:.3f}" if c in r else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(row) for row in cells])
