"""`clip-atlas demo`: the offline default, end to end on the Shapes organism."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from compute.errors import AtlasError
from compute.organisms import ZOO
from compute.shapes.pipeline import build_shapes_store

DEMO_RUN = "shapes-demo"
DEMO_DATA = "shapes-demo-data"
#: The second run, so that Compare and the leaderboard show a comparison out of the box: the Shapes CLIP
#: fine-tuned on a world with a spurious cue (`clip-atlas shapes spurious`), on a quarter as many fresh scenes.
SECOND_RUN = "shapes-spurious-demo"
SECOND_DATA = "shapes-spurious-demo-data"


#: The zoo (`compute.organisms.ZOO`): each organism on the demo's own scenes, a run named ORGANISM-demo.
ZOO_SHARE = 2


def build_demo_store(store: str | Path = "artifacts", n: int = 2000, progress: bool = True, zoo: bool = True) -> Path:
    """The demo store: seed 0 scenes through the Shapes CLIP; with `zoo`, the first n / ZOO_SHARE of the same scenes
    through every organism of the zoo, so the leaderboard ranks architectures on one set of images; seed 1 scenes
    through the spurious-cue organism. Every step with the CLI's defaults. Returns the main run."""
    store = Path(store)
    run = build_shapes_store(store / DEMO_DATA, store / DEMO_RUN, n, seed=0, progress=progress)
    for organism in ZOO if zoo else ():
        build_shapes_store(store / DEMO_DATA, store / f"{organism}-demo", n, seed=0, model=organism,
                           limit=max(50, n // ZOO_SHARE), progress=progress)
    build_shapes_store(store / SECOND_DATA, store / SECOND_RUN, max(50, n // 4), seed=1, model="shapes-spurious",
                       progress=progress)
    return run


def port_free(port: int, address: str = "localhost") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, port))
        except OSError:
            return False
    return True


def run_demo(store: str = "artifacts", n: int = 2000, serve: bool = True, port: int = 8501,
             address: str = "localhost") -> None:
    """Build the demo store, then serve the dashboard on `address` (localhost unless asked: the app has no login
    and accepts uploads) at `port`; a port already in use is an AtlasError before any work."""
    if serve and not port_free(port, address):
        raise AtlasError(f"port {port} is in use (another dashboard?): pass --port with a free one")
    run = build_demo_store(store, n)
    print(f"store ready: {run}")
    if serve:
        app = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
        print(f"dashboard: http://{address}:{port}  (Ctrl-C to stop)")
        r = subprocess.run([sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
                            "--server.address", address, "--", "--store", str(Path(store).resolve())], check=False)
        if r.returncode not in (0, -2, 130):
            raise AtlasError(f"the dashboard stopped with exit status {r.returncode}")
