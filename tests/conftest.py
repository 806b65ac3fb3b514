"""Shared fixtures: small random models (with perturbed 1-d parameters) and small Shapes datasets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# tests run on 2 cores beside other work; one intra-op thread each keeps them predictable
torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CONFIGS = Path(__file__).parent / "model_configs"


def _register() -> None:
    import open_clip

    from compute.models import register_configs
    register_configs()
    if "tiny-avg-ls" not in open_clip.list_models():
        open_clip.add_model_config(CONFIGS)


_register()

#: modules whose module-scoped fixture is parametrised by an independent model: under pytest-xdist each model's
#: tests may go to their own worker (every other module's tests stay on one worker, sharing its fixtures)
SPLIT_BY_MODEL = ("test_tower_pipeline", "test_towers", "test_neurons_towers")
#: run first: their groups are the longest, and a long group scheduled last leaves the other worker idle
FIRST = ("test_tower_pipeline",)


def work_unit(nodeid: str) -> str:
    """The unit of work for one xdist worker: the test's module, or module and model for SPLIT_BY_MODEL."""
    module, _, rest = nodeid.partition("::")
    if Path(module).stem in SPLIT_BY_MODEL and rest.endswith("]") and "[" in rest:
        return f"{module}[{rest.split('[', 1)[1]}"
    return module


@pytest.hookimpl(optionalhook=True)      # a hook of pytest-xdist: plain pytest runs without it
def pytest_xdist_make_scheduler(config, log):
    """`pytest -n N --dist loadscope` (the Makefile's parallel phase) with the groups of `work_unit`."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByModuleAndModel(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    return ByModuleAndModel(config, log)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda it: Path(it.path).stem not in FIRST)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Move biases, LayerNorm gains, LayerScale and embeddings off their init values (zero biases hide bias bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def random_model(name: str, dtype=torch.float32, seed: int = 0):
    import open_clip
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None).eval()
    return perturb(model, seed).to(dtype)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory) -> Path:
    from compute.shapes.dataset import generate
    return generate(48, seed=3, out=tmp_path_factory.mktemp("shapes"), progress=False)


@pytest.fixture(scope="session")
def shapes_run(shapes_dir, tmp_path_factory):
    """A complete run of the random Shapes architecture over the small dataset, with TextSpan and labels."""
    import json

    from compute.jobs.compute import ComputeConfig, run_compute
    from compute.jobs.label import run_label
    from compute.jobs.neurons import run_neurons
    from compute.jobs.textspan import run_textspan
    run = tmp_path_factory.mktemp("store") / "shapes-random"
    run_compute(ComputeConfig("clip-atlas-shapes:random", str(shapes_dir), str(run), layers="last2", batch_size=24),
                progress=False)
    run_textspan(str(run), progress=False)
    run_label(str(run))
    run_neurons(str(run), progress=False)
    return run, json.loads((run / "manifest.json").read_text())
