"""`clip-atlas shapes zoo`: every organism on fresh scene seeds, each leaderboard metric held against ground truth.

The plan (runs, truths, statistic, rule) was fixed in docs/metrics.md before the first zoo run. Per run: the
model-scope metrics of `clip-atlas metrics` and the ground truth of `clip-atlas shapes eval`. Per metric and truth:
Spearman's rank correlation over the runs, and a 95% interval from resampling organisms (an organism's runs share
one trained model, so they are not independent draws).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.organisms import ORGANISMS, ZOO
from compute.shapes.pipeline import build_shapes_store
from compute.store.layout import RunStore

ZOO_ORGANISMS = ("shapes", *ZOO)
ZOO_SEEDS = (701, 702, 703)
METRICS = ("association", "entanglement", "variance_explained", "textspan_reconstruction_cosine", "labelled_share")
LOWER_IS_BETTER = frozenset({"entanglement"})
TRUTHS = ("specialised_share", "label_agreement", "one_to_one")
PRIMARY_TRUTH = "specialised_share"
TRACKS_RHO = 0.5
BOOTSTRAP = 2000
#: The paper's question on the organisms: the larger against the smaller, same width, recipe and data.
LARGER, SMALLER = "shapes-deep", "shapes-small"


@dataclass
class ZooRun:
    organism: str
    seed: int
    run: str
    metrics: dict[str, float]
    truth: dict[str, float]


@dataclass
class Correlation:
    metric: str
    truth: str
    rho: float          # sign flipped for lower-is-better metrics: positive means "agrees with the truth"
    low: float
    high: float
    runs: int
    verdict: str        # tracks | fails | undecided


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        r[tie] = r[tie].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks; nan when either side is constant."""
    rx, ry = ranks(np.asarray(x, float)), ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def verdict(rho: float, low: float, high: float) -> str:
    if math.isnan(rho):
        return "undecided"
    if rho >= TRACKS_RHO and low > 0:
        return "tracks"
    if high < TRACKS_RHO:
        return "fails"
    return "undecided"


def correlate(runs: list[ZooRun], metric: str, truth: str, boot: int = BOOTSTRAP, seed: int = 0) -> Correlation:
    """Spearman over the runs with both values, with an organism-resampling 95% interval."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    pts = [(r.organism, sign * r.metrics.get(metric, math.nan), r.truth.get(truth, math.nan)) for r in runs]
    pts = [p for p in pts if not (math.isnan(p[1]) or math.isnan(p[2]))]
    if len(pts) < 3:
        return Correlation(metric, truth, math.nan, math.nan, math.nan, len(pts), "undecided")
    orgs = sorted({p[0] for p in pts})
    by_org = {o: [(m, t) for q, m, t in pts if q == o] for o in orgs}
    rho = spearman(np.array([p[1] for p in pts]), np.array([p[2] for p in pts]))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(boot):
        sample = [xy for o in rng.choice(orgs, len(orgs)) for xy in by_org[o]]
        r = spearman(np.array([m for m, _ in sample]), np.array([t for _, t in sample]))
        if not math.isnan(r):
            draws.append(r)
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws else (math.nan, math.nan))
    return Correlation(metric, truth, rho, float(low), float(high), len(pts), verdict(rho, float(low), float(high)))


def read_run(run: Path, organism: str, seed: int) -> ZooRun:
    store = RunStore(run)
    table = pq.read_table(store.table_path("metrics"), filters=[("scope", "=", "model")]).to_pylist()
    metrics = {r["metric"]: float(r["value"]) for r in table}
    truth = store.manifest().get("shapes_eval") or {}
    return ZooRun(organism, seed, run.name, metrics, {k: float(v) for k, v in truth.items()})


def build_zoo(out: str | Path, organisms: tuple[str, ...] = ZOO_ORGANISMS, seeds: tuple[int, ...] = ZOO_SEEDS,
              n: int = 1000, progress: bool = True) -> list[ZooRun]:
    """One run per organism and seed, every layer stored (no neurons: the zoo is about heads); the organisms of one
    seed see the same scenes. Steps already done are kept (an interrupted zoo resumes)."""
    unknown = [o for o in organisms if o not in ORGANISMS]
    if unknown:
        raise AtlasError(f"unknown organism {unknown[0]}: choose from {', '.join(ORGANISMS)}")
    out = Path(out)
    runs = []
    for seed in seeds:
        for organism in organisms:
            run = build_shapes_store(out / f"data-{seed}", out / f"{organism}-{seed}", n, seed=seed, model=organism,
                                     layers="all", neurons=False, progress=progress)
            runs.append(read_run(run, organism, seed))
    return runs


def size_question(runs: list[ZooRun]) -> dict[str, dict[str, float]]:
    """Per truth and metric: the larger organism's mean over seeds, the smaller's, and their difference."""
    def mean(name: str, organism: str) -> float:
        vals = [(r.truth | r.metrics).get(name, math.nan) for r in runs if r.organism == organism]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    out = {}
    for name in (*TRUTHS, *METRICS):
        big, small = mean(name, LARGER), mean(name, SMALLER)
        out[name] = {"larger": big, "smaller": small, "difference": big - small}
    return out


def run_zoo(out: str | Path, seeds: tuple[int, ...] = ZOO_SEEDS, n: int = 1000, progress: bool = True) -> dict:
    """Build the zoo's runs, correlate, and write OUT/zoo.json."""
    runs = build_zoo(out, seeds=seeds, n=n, progress=progress)
    correlations = [correlate(runs, m, t) for m in METRICS for t in TRUTHS]
    report = {"seeds": list(seeds), "n": n, "runs": [asdict(r) for r in runs],
              "correlations": [asdict(c) for c in correlations], "size_question": size_question(runs),
              "rule": {"tracks_rho": TRACKS_RHO, "bootstrap": BOOTSTRAP, "primary_truth": PRIMARY_TRUTH}}
    path = Path(out) / "zoo.json"
    path.write_text(json.dumps(report, indent=2))
    return report


def _f(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.3f}"


def format_report(report: dict) -> str:
    """Markdown: the runs' truths and metrics, the correlations with verdicts, the size question."""
    lines = ["| organism | seed | " + " | ".join(TRUTHS) + " | " + " | ".join(METRICS) + " |",
             "|---|---|" + "---|" * (len(TRUTHS) + len(METRICS))]
    for r in report["runs"]:
        lines.append(f"| {r['organism']} | {r['seed']} | " + " | ".join(_f(r["truth"].get(t, math.nan)) for t in TRUTHS)
                     + " | " + " | ".join(_f(r["metrics"].get(m, math.nan)) for m in METRICS) + " |")
    lines += ["", "| metric | truth | Spearman (signed) | 95% interval | runs | verdict |", "|---|---|---|---|---|---|"]
    for c in report["correlations"]:
        lines.append(f"| {c['metric']} | {c['truth']} | {_f(c['rho'])} | [{_f(c['low'])}, {_f(c['high'])}] | "
                     f"{c['runs']} | {c['verdict']} |")
    lines += ["", f"| measure | {LARGER} | {SMALLER} | difference |", "|---|---|---|---|"]
    for name, v in report["size_question"].items():
        lines.append(f"| {name} | {_f(v['larger'])} | {_f(v['smaller'])} | {_f(v['difference'])} |")
    return "\n".join(lines)
