"""Each timm tower family (SigLIP and SigLIP 2 with attention-pool heads and the offline tokenizer, EVA02 with its
rotary embeddings, sub-LN and SwiGLU, PE-Core with EVA blocks and an attention pool; random weights) through the
whole pipeline: the CLI's jobs, both experiments, the API and every dashboard page. The decomposition's exactness is
tested in test_towers.py; here every step must run on each tower and give well-formed results."""
from __future__ import annotations

import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from compute.cli import main

#: spec -> (family, pool type, tokens before the patch grid)
TOWERS = {"ViT-B-16-SigLIP:random": ("timm ViT", "map", 0), "ViT-B-16-SigLIP2:random": ("timm ViT", "map", 0),
          "EVA02-B-16:random": ("timm EVA", "tok", 1), "PE-Core-B-16:random": ("timm EVA", "map", 1)}


@pytest.fixture(scope="module", params=list(TOWERS))
def tower_store(request, tmp_path_factory, shapes_dir):
    root = tmp_path_factory.mktemp("siglip")
    data = shapes_dir
    pool = root / "pool.csv"
    with open(pool, "w", newline="") as f:
        csv.writer(f).writerows([("text", "tags"), ("a red circle", "colors;shapes"), ("a blue square", "colors;shapes"),
                                 ("stripes", "patterns"), ("dots", "patterns"), ("sand", "textures"),
                                 ("water", "textures"), ("the top left", "locations"), ("the bottom right", "locations")])
    store = root / "store"
    run = store / "tower"
    assert main(["compute", "--model", request.param, "--images", str(data), "--out", str(run), "--layers", "last2",
                 "--batch-size", "4", "--limit", "8"]) == 0
    assert main(["textspan", str(run), "--texts", str(pool), "--m", "3"]) == 0
    assert main(["label", str(run)]) == 0
    assert main(["metrics", str(run)]) == 0
    assert main(["index", str(run)]) == 0
    # one MLP layer, a few images: an attention pool's neurons keep D x D moments each (2.4 MB at D = 768 in float32)
    assert main(["neurons", str(run), "--layers", "10", "--images", "4", "--texts", "3", "--memory", "4"]) == 0
    return store, run, data, request.param


def test_the_store_records_the_tower(tower_store):
    _, run, _, spec = tower_store
    family, pool, prefix = TOWERS[spec]
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["family"] == family and m["pool_type"] == pool
    assert m["prefix_tokens"] == prefix and m["image_count"] == 8
    assert m["parameters"] > 1e6 and m["training"] == "random weights"
    share = pq.read_table(run / "images", columns=["pool_mlp_share"]).column("pool_mlp_share").to_numpy()
    # the share through an attention pool's MLP; a class-token tower has no pool MLP, so no share
    assert np.isfinite(share).all() if pool == "map" else np.isnan(share).all()
    assert (run / "textspan.parquet").is_file() and (run / "properties.parquet").is_file()


def test_neurons_run_on_the_tower(tower_store):
    _, run, _, spec = tower_store
    t = pq.read_table(run / "neurons" / "layer=10.parquet").to_pandas()
    n_neurons = 2048 if spec.startswith("EVA02") else 3072            # SwiGLU's hidden width, else 4 x 768
    assert len(t) == n_neurons and (t["images"] == 4).all()
    for col in ("mean_norm", "max_norm", "direct_mean_norm", "direction_share", "main_head_share"):
        assert np.isfinite(t[col]).all(), col
    assert (t["max_norm"] >= t["mean_norm"] - 1e-9).all() and (t["mean_norm"] > 0).all()
    assert t["direction_share"].between(0, 1).all() and (t["main_head_layer"] == 11).all()
    assert t["texts"].map(len).between(1, 3).all()
    assert np.allclose(np.linalg.norm(np.stack(t["direction"].to_numpy()), axis=1), 1, atol=1e-5)


def test_experiments_run_on_the_tower(tower_store, tmp_path):
    _, run, data, spec = tower_store
    out = tmp_path / "seg.csv"
    assert main(["eval", "segmentation", "--model", spec, "--images", str(data / "images"), "--masks",
                 str(data / "masks"), "--labels", str(data / "objects.csv"), "--limit", "4", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"decomposition", "attention", "rollout", "gradcam", "chefer"}
    groups, classes = tmp_path / "groups.csv", tmp_path / "classes.csv"
    labels = list(csv.DictReader(open(data / "labels.csv")))[:8]
    with open(groups, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group")] + [(r["path"], r["label"], str(i % 2))
                                                                for i, r in enumerate(labels)])
    with open(classes, "w", newline="") as f:
        csv.writer(f).writerows([("label", "prompt")] + [(c, f"a {c}") for c in sorted({r["label"] for r in labels})])
    report = tmp_path / "ablation.json"
    assert main(["eval", "ablation", "--model", spec, "--images", str(data), "--groups", str(groups),
                 "--classes", str(classes), "--ablate", "L11.H0,L10.H3", "--out", str(report)]) == 0
    assert {c["name"] for c in json.loads(report.read_text())["conditions"]} == {"base", "random", "property"}


def test_the_api_answers_on_the_tower(tower_store):
    from compute import api
    _, run, data, _ = tower_store
    r = api.open_run(run)
    image = sorted((data / "images").glob("*.png"))[0]
    heat = r.segment(image, "a red circle")
    assert heat.shape == (14, 14) and np.isfinite(heat).all()
    assert len(r.neighbours(int(r.images().image_id[0]), 11, 2, k=3)) == 3
    assert len(r.heads()) == 24
    assert r.describe(image).texts.shape[0] > 0
    assert len(r.neurons(10, limit=5)) == 5
    nmap = r.neuron_map(image, 10, int(r.neurons(10, limit=1).neuron[0]))
    assert nmap.shape == (14, 14) and np.isfinite(nmap).all()


def test_every_dashboard_page_renders_on_the_tower(tower_store):
    from tests.test_dashboard import PAGES, app
    store, _, _, _ = tower_store
    for page in PAGES:
        at = app(store, page)
        assert not at.exception, (page, at.exception)
