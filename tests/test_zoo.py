"""The zoo's statistics on inputs whose answers are known, and every committed organism loads and decomposes exactly."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compute.shapes.groundtruth import one_to_one
from compute.shapes.zoo import ZooRun, correlate, ranks, spearman, verdict


def test_ranks_share_ties():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_spearman_known_answers():
    x = np.arange(6.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(6)))
    # d = rank differences (0, 0, 1, -1): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 2, 4, 3])) == pytest.approx(0.8)


def test_verdicts_follow_the_rule():
    assert verdict(0.7, 0.1, 0.9) == "tracks"
    assert verdict(0.7, -0.1, 0.9) == "undecided"
    assert verdict(0.2, -0.5, 0.45) == "fails"
    assert verdict(float("nan"), 0, 0) == "undecided"


def _runs(metric_of_truth, lower_is_better=False):
    runs = []
    for i, org in enumerate("abcdef"):
        for seed in range(3):
            truth = i + 0.1 * seed
            runs.append(ZooRun(org, seed, f"{org}-{seed}", {"m": metric_of_truth(truth, i, seed)},
                               {"t": truth}))
    return runs


def test_a_metric_equal_to_the_truth_tracks_it_and_noise_does_not():
    c = correlate(_runs(lambda t, i, s: 2 * t + 1), "m", "t", boot=300)
    assert c.rho == pytest.approx(1.0) and c.low == pytest.approx(1.0) and c.verdict == "tracks" and c.runs == 18
    rng = np.random.default_rng(0)
    noise = {(i, s): rng.normal() for i in range(6) for s in range(3)}
    c = correlate(_runs(lambda t, i, s: noise[(i, s)]), "m", "t", boot=300)
    assert c.verdict != "tracks" and c.low < 0 < c.high


def test_lower_is_better_metrics_are_sign_flipped():
    runs = [ZooRun(r.organism, r.seed, r.run, {"entanglement": -r.truth["t"]}, r.truth)
            for r in _runs(lambda t, i, s: 0.0)]
    c = correlate(runs, "entanglement", "t", boot=100)
    assert c.rho == pytest.approx(1.0)


def test_runs_missing_a_value_are_left_out():
    runs = _runs(lambda t, i, s: t)
    runs[0].metrics["m"] = float("nan")
    assert correlate(runs, "m", "t", boot=50).runs == 17


def _heads(lifts):
    return [{"layer": 0, "head": h, "attribute": a, "lift": v} for h, row in enumerate(lifts) for a, v in row.items()]


def test_one_to_one_known_answers():
    # each attribute has a head that carries it alone and perfectly
    perfect = _heads([{"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 1.0}])
    assert one_to_one(perfect) == pytest.approx(1.0)
    # one head carries both attributes equally: neither maps to one head
    shared = _heads([{"x": 0.8, "y": 0.8}, {"x": 0.1, "y": 0.1}])
    assert one_to_one(shared) == pytest.approx(0.0)
    # x: best margin 0.6 - 0.2 on head 0; y: head 1's 0.5 - 0.1
    mixed = _heads([{"x": 0.6, "y": 0.2}, {"x": 0.1, "y": 0.5}])
    assert one_to_one(mixed) == pytest.approx((0.4 + 0.4) / 2)


@pytest.mark.parametrize("organism", ["shapes", "shapes-small", "shapes-deep", "shapes-p16", "shapes-siglip"])
def test_each_committed_organism_loads_and_decomposes_exactly(organism):
    from compute.maths.decompose import Decomposer
    from compute.models import load_model, organism_weights
    from compute.shapes.card import card_path
    weights = organism_weights(organism)
    if not weights.is_file():
        pytest.fail(f"{organism}'s weights are not committed at {weights}")
    assert weights.stat().st_size <= 25 * 2**20 and card_path(weights).is_file()
    model = load_model(organism).model
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    n_layers = model.visual.trunk.blocks.__len__() if hasattr(model.visual, "trunk") else model.visual.transformer.layers
    d = Decomposer(model, head_layers=range(n_layers), token_layers=[n_layers - 1])(x)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(x), dim=-1)
    assert (d.total() - ref).abs().max() < 1e-5
    assert (d.heads.sum(2) - d.attn).abs().max() < 1e-5
    assert (d.tokens.sum(3)[:, 0] - d.heads[:, -1]).abs().max() < 1e-5


def test_every_organism_gets_the_shapes_texts_and_prompt():
    """A zoo run labelled with the general pool said 'colors' of background heads: every organism is a Shapes model."""
    from compute.jobs.textspan import default_pool
    from compute.organisms import ORGANISMS
    from compute.texts import zero_shot_template
    for arch in ORGANISMS.values():
        assert default_pool(arch) == "shapes" and zero_shot_template(arch) == "a {}"
    assert default_pool("ViT-B-16") == "general" and zero_shot_template("ViT-B-16") == "a photo of a {}."


def test_the_zoo_report_from_its_runs(monkeypatch, tmp_path):
    """run_zoo's wiring on synthetic runs: every metric against every truth, the size question, the markdown."""
    import json

    import compute.shapes.zoo as zoo
    orgs = ["shapes", "shapes-small", "shapes-deep", "shapes-p16", "shapes-siglip"]
    runs = []
    for i, org in enumerate(orgs):
        for seed in zoo.ZOO_SEEDS:
            t = i + 0.01 * seed
            runs.append(ZooRun(org, seed, f"{org}-{seed}", {m: t if m != "entanglement" else -t for m in zoo.METRICS},
                               {k: t for k in zoo.TRUTHS}))
    monkeypatch.setattr(zoo, "build_zoo", lambda out, seeds, n, progress: runs)
    report = zoo.run_zoo(tmp_path, n=10, progress=False)
    assert json.loads((tmp_path / "zoo.json").read_text())["n"] == 10
    assert len(report["correlations"]) == len(zoo.METRICS) * len(zoo.TRUTHS)
    assert all(c["verdict"] == "tracks" for c in report["correlations"])
    q = report["size_question"]["specialised_share"]
    assert q["difference"] == pytest.approx(q["larger"] - q["smaller"]) and q["difference"] > 0
    text = zoo.format_report(report)
    assert "| entanglement | specialised_share | 1.000 |" in text and "shapes-deep" in text
