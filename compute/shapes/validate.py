"""`clip-atlas shapes validate`: the whole pipeline, with the CLI's defaults, on fresh scenes from seeds
that neither training, the demo, nor the choice of defaults used, scored against ground truth.

Per seed (scenes the model never saw): generate, compute, textspan, label, shapes eval; then
- label_agreement: share of the clearly specialised heads whose label names their attribute
  (unlabelled counts as a miss);
- labelled_specialised: share of the specialised heads that got any label;
- head_nn_lift: mean precision@8 lift of the specialised heads on their own attribute;
- property_p4_<attr> / property_p4_lift: precision@4 of property search (the property vector of each
  one-object scene against every other's, dot product) for neighbours sharing the query's value of
  that attribute; lift as for heads ((p - chance) / (1 - chance)); absent where no head got the label;
- segmentation_miou and segmentation_miou_shuffled (the same maps with their patches shuffled);
- textspan_stability: mean share of top-5 TextSpan picks shared by two halves of the images;
- describe_precision_at_3 / describe_chance_at_3: how often the first 3 texts of an image's description
  (`Run.describe`) are true of the scene, and the same texts' base rate (shapes/describe.py).
Then mean, standard deviation and minimum over seeds. Seeds: VALIDATION_SEEDS (101, 102, ...);
training used seed 0, the demo seed 0, the tuning of defaults seeds 11-13 (docs/labels.md).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from compute import checks
from compute.shapes.groundtruth import chance_level, scene_table, single_object_values
from compute.shapes.pipeline import build_shapes_store
from compute.store.layout import RunStore, write_json_atomic, write_table_atomic
from compute.store.readers import read_rows

VALIDATION_SEED_BASE = 101
P_AT = 4


def property_precision(store: RunStore, ids: np.ndarray, values: dict[str, np.ndarray], single: np.ndarray,
                       k: int = P_AT) -> dict[str, float]:
    """precision@k of property search per labelled property that names an attribute (over the scored scenes)."""
    out = {}
    for a, v in values.items():
        folder = store.property_dir(a)
        files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
        if not files:
            continue
        X = read_rows(files, "vector", ids[single])
        sims = X @ X.T
        np.fill_diagonal(sims, -np.inf)
        nn = np.argpartition(-sims, k, axis=1)[:, :k]
        out[a] = float((v[nn] == v[:, None]).mean())
    return out


def score_run(run: Path) -> dict[str, float]:
    """The validation figures of one evaluated run (see the module docstring)."""
    store = RunStore(run)
    summary = store.manifest()["shapes_eval"]
    truth = pq.read_table(store.table_path("shapes_heads")).to_pylist()
    labels = {(r["layer"], r["head"]): r["property"] for r in pq.read_table(store.table_path("properties")).to_pylist()}
    spec = [r for r in truth if r["specialised"]]
    ids, scenes, _, rows = scene_table(store)
    single, values = single_object_values(scenes, rows)
    p4 = property_precision(store, ids, values, single)
    stab = pq.read_table(store.table_path("textspan_heads"), columns=["stability"]).column("stability").to_numpy()
    out = {
        "specialised_heads": float(len(spec)),
        "label_agreement": float(np.mean([labels.get((r["layer"], r["head"])) == r["attribute"] for r in spec])) if spec else float("nan"),
        "labelled_specialised": float(np.mean([labels.get((r["layer"], r["head"])) != "unlabelled" for r in spec])) if spec else float("nan"),
        "head_nn_lift": float(np.mean([r["lift"] for r in spec])) if spec else float("nan"),
        "segmentation_miou": summary["segmentation_miou"],
        "segmentation_miou_shuffled": summary["segmentation_miou_shuffled"],
        "textspan_stability": float(stab.mean()),
        **{k: summary[k] for k in ("describe_precision_at_3", "describe_chance_at_3") if k in summary},
    }
    lifts = []
    for a, p in p4.items():
        ch = chance_level(values[a])
        out[f"property_p4_{a}"] = p
        lifts.append((p - ch) / (1 - ch))
    out["property_p4_lift"] = float(np.mean(lifts)) if lifts else float("nan")
    return out


def validate(out: str | Path, seeds: int = 3, n: int = 2000, seed_base: int = VALIDATION_SEED_BASE,
             progress: bool = True) -> dict:
    """Runs every seed (resumable: finished steps are kept), writes report.json and report.parquet, returns the report."""
    checks.at_least(1, seeds=seeds)
    checks.at_least(50, n=n)
    out = Path(out)
    per_seed = {}
    for s in range(seed_base, seed_base + seeds):
        run = build_shapes_store(out / f"data-{s}", out / f"run-{s}", n, seed=s, metrics=False, progress=progress)
        per_seed[s] = score_run(run)
    metrics = sorted({k for v in per_seed.values() for k in v})
    summary = {}
    for k in metrics:
        xs = np.array([per_seed[s].get(k, np.nan) for s in per_seed], float)
        ok = xs[~np.isnan(xs)]
        summary[k] = {"mean": float(ok.mean()) if len(ok) else float("nan"),
                      "std": float(ok.std()) if len(ok) else float("nan"),
                      "min": float(ok.min()) if len(ok) else float("nan"), "seeds": len(ok)}
    report = {"n": n, "seeds": list(per_seed), "per_seed": {str(s): v for s, v in per_seed.items()}, "summary": summary}
    write_json_atomic(report, out / "report.json")
    write_table_atomic(pa.table({"seed": [s for s in per_seed for _ in metrics],
                                 "metric": [k for _ in per_seed for k in metrics],
                                 "value": [per_seed[s].get(k, float("nan")) for s in per_seed for k in metrics]}),
                       out / "report.parquet")
    return report


def format_report(report: dict) -> str:
    seeds = report["seeds"]
    head = f"{'metric':28s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in seeds) + f" {'mean':>7s} {'std':>6s} {'min':>6s}"
    lines = [f"Shapes validation: {len(seeds)} fresh seeds x {report['n']} scenes, CLI defaults", head]
    for k, sm in report["summary"].items():
        vals = " ".join(f"{report['per_seed'][str(s)].get(k, float('nan')):9.3f}" for s in seeds)
        lines.append(f"{k:28s} {vals} {sm['mean']:7.3f} {sm['std']:6.3f} {sm['min']:6.3f}")
    return "\n".join(lines)
