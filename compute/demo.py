"""`clip-atlas demo`: the offline default, end to end on the Shapes organism."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compute.store.layout import RunStore

DEMO_RUN = "shapes-demo"
DEMO_DATA = "shapes-demo-data"


def build_demo_store(store: str | Path = "artifacts", n: int = 2000, progress: bool = True) -> Path:
    """The demo store: seed 0 scenes, every step with the CLI's defaults."""
    store = Path(store)
    return build_shapes_store(store / DEMO_DATA, store / DEMO_RUN, n, seed=0, progress=progress)


def build_shapes_store(data: Path, run: Path, n: int, seed: int, metrics: bool = True, progress: bool = True,
                       model: str = "shapes") -> Path:
    """Generate scenes, compute their store with a Shapes model, then TextSpan, labels, metrics, ground truth,
    each with the CLI's defaults (nothing is tuned here). Each step is skipped when its output is already there."""
    from compute.jobs.compute import ComputeConfig, run_compute
    from compute.jobs.metrics import run_metrics
    from compute.jobs.label import run_label
    from compute.shapes.dataset import generate
    from compute.shapes.groundtruth import evaluate_run
    from compute.jobs.neurons import run_neurons
    from compute.jobs.textspan import run_textspan
    from compute.store.index import build_index
    if not (data / "scenes.parquet").is_file():
        generate(n, seed=seed, out=data, progress=progress)
    rs = RunStore(run)
    if not rs.exists() or rs.manifest().get("status") != "complete":
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


def run_demo(store: str = "artifacts", n: int = 2000, serve: bool = True, port: int = 8501) -> None:
    run = build_demo_store(store, n)
    print(f"store ready: {run}")
    if serve:
        app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
        print(f"dashboard: http://localhost:{port}  (Ctrl-C to stop)")
        subprocess.run([sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
                        "--", "--store", str(Path(store).resolve())], check=False)
