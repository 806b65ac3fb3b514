"""The Shapes pipeline: scenes -> store -> TextSpan -> labels -> neurons -> ground truth -> metrics -> index, each step
with the CLI's defaults (the demo, `shapes validate` and `shapes spurious` all build their stores through it)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from compute.jobs.compute import ComputeConfig, run_compute
from compute.jobs.index import build_index
from compute.jobs.label import run_label
from compute.jobs.metrics import run_metrics
from compute.jobs.neurons import neurons_unsupported, run_neurons
from compute.jobs.textspan import run_textspan
from compute.shapes.dataset import generate
from compute.shapes.groundtruth import evaluate_run
from compute.store.layout import RunStore


def build_shapes_store(data: Path, run: Path, n: int, seed: int, metrics: bool = True, progress: bool = True,
                       model: str = "shapes", layers: str = ComputeConfig.layers, limit: int | None = None,
                       neurons: bool = True) -> Path:
    """Generate scenes, compute their store with a Shapes model, then TextSpan, labels, neurons (where the tower
    has them), ground truth, metrics, each with the CLI's defaults (nothing is tuned here; `layers`: which layers'
    heads to store; `limit`: decompose only the first scenes; `neurons`: False skips them). Each step is skipped when its output is already there; with `progress`, each step says its
    name and number before its own progress bar (count, rate, ETA)."""
    rs = RunStore(run)

    def neuron_step() -> None:
        reason = neurons_unsupported(str(run))
        if reason:
            print(f"{run.name}: no neurons ({reason})", file=sys.stderr, flush=True)
        else:
            run_neurons(str(run), progress=progress)
    steps = [
        ("generate scenes", lambda: (data / "scenes.parquet").is_file(),
         lambda: generate(n, seed=seed, out=data, progress=progress)),
        (f"decompose with {model}", rs.is_complete,
         lambda: run_compute(ComputeConfig(model, str(data), str(run), layers=layers, limit=limit), progress=progress)),
        ("TextSpan", lambda: rs.table_path("textspan_heads").is_file(), lambda: run_textspan(str(run), progress=progress)),
        ("label heads", lambda: rs.table_path("properties").is_file(), lambda: run_label(str(run))),
        ("neurons", lambda: not neurons or any((run / "neurons").glob("layer=*.parquet")), neuron_step),
        ("ground truth", lambda: rs.table_path("shapes_heads").is_file(), lambda: evaluate_run(str(run), progress=progress)),
        ("metrics", lambda: not metrics or rs.table_path("metrics").is_file(), lambda: run_metrics(str(run), progress=progress)),
        ("index", lambda: False, lambda: build_index(str(run), progress=progress)),   # skips heads already current
    ]
    for i, (name, done, work) in enumerate(steps, 1):
        if done():
            continue
        if progress:
            print(f"{run.name} [{i}/{len(steps)}] {name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        work()
        if progress:
            print(f"{run.name} [{i}/{len(steps)}] {name}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr,
                  flush=True)
    return run
