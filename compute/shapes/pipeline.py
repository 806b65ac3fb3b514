"""The Shapes pipeline: scenes -> store -> TextSpan -> labels -> neurons -> ground truth -> metrics -> index, each step
with the CLI's defaults (the demo, `shapes validate` and `shapes spurious` all build their stores through it)."""
from __future__ import annotations

from pathlib import Path

from compute.jobs.compute import ComputeConfig, run_compute
from compute.jobs.index import build_index
from compute.jobs.label import run_label
from compute.jobs.metrics import run_metrics
from compute.jobs.neurons import run_neurons
from compute.jobs.textspan import run_textspan
from compute.shapes.dataset import generate
from compute.shapes.groundtruth import evaluate_run
from compute.store.layout import RunStore


def build_shapes_store(data: Path, run: Path, n: int, seed: int, metrics: bool = True, progress: bool = True,
                       model: str = "shapes") -> Path:
    """Generate scenes, compute their store with a Shapes model, then TextSpan, labels, metrics, ground truth,
    each with the CLI's defaults (nothing is tuned here). Each step is skipped when its output is already there."""
    if not (data / "scenes.parquet").is_file():
        generate(n, seed=seed, out=data, progress=progress)
    rs = RunStore(run)
    if not rs.is_complete():
        run_compute(ComputeConfig(model, str(data), str(run)), progress=progress)
    if not rs.table_path("textspan_heads").is_file():
        run_textspan(str(run), progress=progress)
    if not rs.table_path("properties").is_file():
        run_label(str(run))
    if not any((run / "neurons").glob("layer=*.parquet")):
        run_neurons(str(run), progress=progress)
    if not rs.table_path("shapes_heads").is_file():
        evaluate_run(str(run), progress=progress)
    if metrics and not rs.table_path("metrics").is_file():
        run_metrics(str(run), progress=progress)
    build_index(str(run), progress=progress)       # skips heads whose index is current
    return run
