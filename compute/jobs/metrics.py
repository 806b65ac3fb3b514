"""Interpretability metrics of a run, and the leaderboard over runs. Definitions: docs/metrics.md."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.eval.ablation import mean_ablate
from compute.jobs.label import UNLABELLED, HeadLabel
from compute.maths.decompose import component_layout
from compute.models import load_model
from compute.store.layout import RunStore
from compute.store.query import Store
from compute.store.readers import iter_chunks, vector_column
from compute.texts import fill_template, zero_shot_template


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
    ablated = mean_ablate(embeddings, part[None], part.mean(0, keepdims=True))
    num = (embeddings * ablated).sum(1)
    den = np.linalg.norm(embeddings, axis=1) * np.linalg.norm(ablated, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))



def textspan_reconstruction(C: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """[H, N, D] contributions, [H, m, D] orthonormal TextSpan directions -> reconstructions (mean + span part)."""
    return textspan_reconstruction_around(C, C.mean(1, keepdims=True), directions)


def textspan_reconstruction_around(C: np.ndarray, mean: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """The same around a given per-head mean [H, 1, D] (the whole run's, when C is one chunk of it)."""
    # ((C - mean) D^T) D per head: two matmuls (a three-operand einsum would cost H n D^2 m)
    return mean + ((C - mean) @ directions.transpose(0, 2, 1)) @ directions


def head_directions(ts: pa.Table) -> tuple[list[tuple[int, int]], np.ndarray, list[dict]]:
    """From the TextSpan picks: the heads described, their orthonormal text directions zero-padded to the most
    picks any head has [heads, m, D] (TextSpan stops early on a head whose variance is spent, so counts differ;
    a zero row adds nothing to a projection), and each head's last pick (its cumulative variance)."""
    ts = ts.take(pc.sort_indices(ts, [("layer", "ascending"), ("head", "ascending"), ("rank", "ascending")]))
    rows = ts.select(["layer", "head", "rank", "cumulative_variance"]).to_pylist()
    vecs = vector_column(ts, "direction")
    picks: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(rows):
        picks.setdefault((r["layer"], r["head"]), []).append(i)
    m = max((len(v) for v in picks.values()), default=0)
    dirs = np.zeros((len(picks), m, vecs.shape[1] if len(vecs) else 0), np.float32)
    for p, idx in enumerate(picks.values()):
        dirs[p, :len(idx)] = vecs[idx]
    return list(picks), dirs, [rows[idx[-1]] for idx in picks.values()]


#: Model-level metrics as a person reads them: (name shown, definition, which way is better). docs/metrics.md.
METRIC_INFO = {
    "association": ("Association", "mean share of a labelled head's texts tagged with its property", "higher"),
    "entanglement": ("Entanglement", "mean share of the other labelled heads that carry the same property", "lower"),
    "properties": ("Properties", "distinct properties among labelled heads", ""),
    "labelled_heads": ("Labelled heads", "heads whose two image halves agree on a property", ""),
    "labelled_share": ("Labelled share", "labelled heads over the heads TextSpan described (comparable across sizes)",
                       "higher"),
    "variance_explained": ("Variance explained", "mean share of a head's variance its TextSpan texts remove", "higher"),
    "zero_shot_accuracy": ("Zero-shot accuracy", "accuracy of the embeddings with the model's zero-shot prompt", "higher"),
    "textspan_reconstruction_cosine": ("TextSpan reconstruction (cosine)", "mean cosine of the embedding with the one "
                                       "rebuilt from each head's TextSpan reconstruction", "higher"),
    "textspan_reconstruction_zero_shot": ("TextSpan reconstruction (zero-shot)", "zero-shot accuracy of those "
                                          "rebuilt embeddings", "higher"),
}


#: Each metric held against ground truth on the Shapes zoo (docs/metrics.md, `clip-atlas shapes zoo`): its verdict
#: against the primary truth (the share of specialised heads) and the rank correlation with its interval.
#: From artifacts/shapes-zoo/zoo.json (5 organisms x seeds 701-703); the rule and the table are in docs/metrics.md.
METRIC_VALIDATION: dict[str, tuple[str, float, float, float]] = {
    "association": ("undecided", 0.27, -0.89, 0.71),
    "entanglement": ("undecided", -0.44, -0.85, 0.82),
    "variance_explained": ("undecided", 0.17, -0.81, 0.97),
    "textspan_reconstruction_cosine": ("undecided", 0.43, -0.62, 0.94),
    "labelled_share": ("undecided", 0.55, -0.58, 0.99),
}


def metric_help(metric: str) -> str:
    """The definition, and what the zoo said of the metric, for a hover."""
    text = METRIC_INFO.get(metric, ("", "", ""))[1]
    if metric in METRIC_VALIDATION:
        verdict, rho, low, high = METRIC_VALIDATION[metric]
        text += (f". Against ground truth on the Shapes zoo: {verdict} (Spearman {rho:.2f}, 95% interval "
                 f"{low:.2f} to {high:.2f}; docs/metrics.md)")
    elif metric in METRIC_INFO:
        text += ". Not held against ground truth"
    return text


def metric_label(metric: str) -> str:
    name, _, better = METRIC_INFO.get(metric, (metric.replace("_", " "), "", ""))
    return f"{name} ({better} is better)" if better else name


@dataclass
class Metric:
    """One row of metrics.parquet."""
    scope: str                  # model | layer | head
    metric: str
    value: float
    layer: int | None = None
    head: int | None = None


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def run_metrics(run: str, progress: bool = True) -> pa.Table:
    """`clip-atlas metrics`: RUN/metrics.parquet with model-, layer- and head-scope rows.

    Two streamed passes over the run's chunks (memory: one chunk's rows, whatever the number of images):
    the first sums what the mean ablations need, the second scores each image against those means."""
    store = RunStore(run)
    man = store.require_complete()
    rows: list[Metric] = []

    def add(scope: str, metric: str, value: float, layer: int | None = None, head: int | None = None) -> None:
        rows.append(Metric(scope, metric, float(value), layer, head))

    kinds, layers = component_layout(man["layers"])
    labels_col = pq.read_table(store.root / "images", columns=["label"]).column("label").to_pylist()
    zs = _zero_shot_setup(man["model"], man["architecture"], labels_col) if any(labels_col) else None
    index = {n: i for i, n in enumerate(zs[2])} if zs else {}
    ablated = [k for k, kd in enumerate(kinds) if kd in ("attn", "mlp")]
    # TextSpan: each head's directions, when present
    ts_path, pr_path = store.table_path("textspan"), store.table_path("properties")
    pairs, dirs, last = [], None, []
    if ts_path.is_file():
        pairs, dirs, last = head_directions(pq.read_table(ts_path))

    def labels_of(chunk) -> np.ndarray:
        return np.array([index.get(lb, -1) for lb in chunk.labels])

    # pass 1: sums for the means, and the model's own zero-shot accuracy
    n, comp_sum, head_sum, correct = 0, 0.0, 0.0, 0
    for chunk in iter_chunks(store, pairs, components=True, labels=True):
        n += len(chunk.ids)
        comp_sum = comp_sum + chunk.components.astype(np.float64).sum(0)
        if pairs:
            head_sum = head_sum + chunk.heads.astype(np.float64).sum(1)
        if zs:
            correct += int((np.argmax(chunk.embedding @ zs[0].T, 1) == labels_of(chunk)).sum())
    comp_mean = (comp_sum / n).astype(np.float32)
    head_mean = (head_sum / n).astype(np.float32)[:, None] if pairs else None
    if zs:
        add("model", "zero_shot_accuracy", correct / n)
    # pass 2: each image against the means
    cos_sum, zs_sum = np.zeros(len(kinds)), np.zeros(len(kinds))
    recon_cos, recon_zs = 0.0, 0
    for chunk in iter_chunks(store, pairs, components=True, labels=True):
        emb, y = chunk.embedding, labels_of(chunk) if zs else None
        for k in ablated:
            abl = mean_ablate(emb, chunk.components[None, :, k], comp_mean[None, k])
            cos_sum[k] += _cosine(emb, abl).sum()
            if zs:
                zs_sum[k] += int((np.argmax(abl @ zs[0].T, 1) == y).sum())
        if pairs:
            recon = textspan_reconstruction_around(chunk.heads, head_mean, dirs)
            swapped = emb - chunk.heads.sum(0) + recon.sum(0)
            recon_cos += _cosine(emb, swapped).sum()
            if zs:
                recon_zs += int((np.argmax(swapped @ zs[0].T, 1) == y).sum())
    for kind in ("attn", "mlp"):
        for k in (k for k in ablated if kinds[k] == kind):
            add("layer", f"ablation_cosine_{kind}", cos_sum[k] / n, layers[k])
            if zs:
                add("layer", f"ablation_zero_shot_{kind}", zs_sum[k] / n, layers[k])
    if pairs:
        for r in last:
            add("head", "variance_explained", r["cumulative_variance"], r["layer"], r["head"])
        add("model", "variance_explained", np.mean([r["cumulative_variance"] for r in last]))
        add("model", "textspan_reconstruction_cosine", recon_cos / n)
        if zs:
            add("model", "textspan_reconstruction_zero_shot", recon_zs / n)
    if pr_path.is_file():
        labels = [HeadLabel(**{k: r[k] for k in ("layer", "head", "property", "confidence", "method", "share") if k in r})
                  for r in pq.read_table(pr_path).to_pylist()]
        add("model", "association", association(labels))
        add("model", "entanglement", entanglement(labels))
        add("model", "properties", len({x.property for x in labels if x.property != UNLABELLED}))
        add("model", "labelled_heads", sum(x.property != UNLABELLED for x in labels))
        add("model", "labelled_share", sum(x.property != UNLABELLED for x in labels) / max(1, len(labels)))
        for x in labels:
            add("head", "property_confidence", x.confidence, x.layer, x.head)
    table = pa.table({"run": [store.root.name] * len(rows), "model": [man["model"]] * len(rows),
                      "scope": [r.scope for r in rows], "layer": pa.array([r.layer for r in rows], pa.int16()),
                      "head": pa.array([r.head for r in rows], pa.int16()), "metric": [r.metric for r in rows],
                      "value": pa.array([r.value for r in rows], pa.float64())})
    store.write_derived("metrics", table)
    return table


def _zero_shot_setup(model: str, architecture: str, labels: list[str | None]):
    """Class-name embeddings and integer labels, for the images that have a label."""
    names = sorted({l for l in labels if l})
    if len(names) < 2 or len(names) > 1000:
        return None
    loaded = load_model(model)
    class_emb = loaded.encode_texts(fill_template(zero_shot_template(architecture), names)).cpu().numpy()
    index = {n: i for i, n in enumerate(names)}
    y = np.array([index.get(l, -1) for l in labels])
    return class_emb, y, names


def leaderboard(store: str | Path = "artifacts") -> tuple[list[str], list[dict]]:
    """(metric names, one row per run) from every complete run's metrics under the store (the query layer's
    leaderboard, pivoted for the terminal)."""
    rows = Store(store).leaderboard()
    if not rows:
        raise AtlasError(f"no runs with metrics under {store}; run `clip-atlas metrics RUN` first")
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
