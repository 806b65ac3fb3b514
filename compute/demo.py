"""`clip-atlas demo`: the offline default, end to end on the Shapes organism."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from compute.shapes.pipeline import build_shapes_store

DEMO_RUN = "shapes-demo"
DEMO_DATA = "shapes-demo-data"


def build_demo_store(store: str | Path = "artifacts", n: int = 2000, progress: bool = True) -> Path:
    """The demo store: seed 0 scenes, every step with the CLI's defaults."""
    store = Path(store)
    return build_shapes_store(store / DEMO_DATA, store / DEMO_RUN, n, seed=0, progress=progress)


def run_demo(store: str = "artifacts", n: int = 2000, serve: bool = True, port: int = 8501) -> None:
    run = build_demo_store(store, n)
    print(f"store ready: {run}")
    if serve:
        app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
        print(f"dashboard: http://localhost:{port}  (Ctrl-C to stop)")
        subprocess.run([sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
                        "--", "--store", str(Path(store).resolve())], check=False)
