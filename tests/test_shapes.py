"""The Shapes world and model: determinism, masks against attributes, the committed weights, training, ground truth."""
from __future__ import annotations

import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from compute.shapes.world import ATTRIBUTES, COLORS, Renderer, Tie, WorldSpec, caption, position_center


def test_generator_is_deterministic(tmp_path):
    from compute.shapes.dataset import generate
    a, b = generate(12, 7, tmp_path / "a", progress=False), generate(12, 7, tmp_path / "b", progress=False)
    assert pq.read_table(a / "scenes.parquet").equals(pq.read_table(b / "scenes.parquet"))
    assert np.array_equal(np.load(a / "masks.npy"), np.load(b / "masks.npy"))
    for f in sorted((a / "images").iterdir()):
        assert f.read_bytes() == (b / "images" / f.name).read_bytes()
    c = generate(12, 8, tmp_path / "c", progress=False)
    assert not pq.read_table(a / "scenes.parquet").equals(pq.read_table(c / "scenes.parquet"))


def test_masks_agree_with_attributes():
    spec, rng, renderer = WorldSpec(two_object_prob=0.0), random.Random(0), Renderer(0)
    areas = {"small": [], "large": []}
    for _ in range(200):
        scene = spec.sample(rng)
        img, mask = renderer.render(scene, rng)
        obj = scene.objects[0]
        ys, xs = np.nonzero(mask == 1)
        assert len(ys) > 20
        cy, cx = position_center(obj.position)
        # the object's mask is centred on its grid cell (within the jitter and the triangle's offset)
        assert abs(ys.mean() - cy) < 5 and abs(xs.mean() - cx) < 4
        areas[obj.size].append(len(ys) if obj.shape == "square" else None)
        if obj.pattern == "solid":
            inner = img[mask == 1].astype(float)
            # most object pixels are the named colour (the rest is the dark outline)
            close = np.abs(inner - np.array(COLORS[obj.color])).max(1) < 40
            assert close.mean() > 0.6
    small = [a for a in areas["small"] if a]
    large = [a for a in areas["large"] if a]
    assert min(large) > 1.5 * max(small)


def test_two_objects_take_two_cells_and_ties_hold():
    spec = WorldSpec(two_object_prob=1.0, ties=(Tie("shape", "circle", "background", "water", 1.0),))
    rng = random.Random(1)
    for _ in range(100):
        s = spec.sample(rng)
        assert len(s.objects) == 2 and s.objects[0].position != s.objects[1].position
        if s.objects[0].shape == "circle":
            assert s.background == "water"
    text = caption(s, rng, full=True)
    for o in s.objects:
        assert o.color in text and o.shape in text and o.position in text


def test_a_few_steps_lower_the_loss():
    from compute.shapes.train import BatchMaker, TrainConfig, build_model, clip_loss, make_optimizer
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=32, group_size=8, lr=1e-3)
    model, tok = build_model()
    pc = model.visual.preprocess_cfg
    images, tokens = BatchMaker(cfg, tok, pc["mean"], pc["std"])()
    opt = make_optimizer(model, cfg)
    model.train()
    losses = []
    for _ in range(6):
        loss = clip_loss(model, images, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_groups_differ_in_exactly_one_attribute():
    from compute.shapes.train import sample_group
    rng = random.Random(3)
    vary = {a: 1.0 for a in ATTRIBUTES}
    for _ in range(30):
        base, *variants = sample_group(WorldSpec(), rng, 8, vary)
        assert len({base, *variants}) == 8
        for v in variants:
            diffs = [a for a in ATTRIBUTES for o in range(len(base.objects)) if base.get(a, o) != v.get(a, o)]
            assert len(set(diffs)) == 1


@pytest.fixture(scope="module")
def shapes_model():
    from compute.models import SHAPES_WEIGHTS, load_model
    if not SHAPES_WEIGHTS.is_file():
        pytest.fail("the committed Shapes weights are missing")
    return load_model("shapes")


def test_committed_weights_meet_caption_targets(shapes_model):
    from compute.shapes.accuracy import CAPTION_TARGETS, attribute_accuracy
    acc = attribute_accuracy(shapes_model.model, shapes_model.tokenizer, n=300, seed=4242)["caption"]
    # a small held-out set: allow 0.03 of sampling slack under the card's 1,000-scene figures
    for attr, target in CAPTION_TARGETS.items():
        assert acc[attr] >= target - 0.03, (attr, acc[attr], target)


def test_shapes_weights_are_small_and_card_is_there():
    from compute.models import SHAPES_WEIGHTS
    assert SHAPES_WEIGHTS.stat().st_size <= 25 * 2**20
    assert (SHAPES_WEIGHTS.parent / "MODEL_CARD.md").is_file()


def test_ground_truth_eval_writes_tables(shapes_run):
    from compute.shapes.groundtruth import evaluate_run
    run, m = shapes_run
    summary = evaluate_run(str(run), progress=False)
    heads = pq.read_table(run / "shapes_heads.parquet")
    assert heads.num_rows == len(m["head_layers"]) * m["heads"] * len(ATTRIBUTES)
    seg = pq.read_table(run / "shapes_segmentation.parquet").to_pylist()
    assert seg and all(0 <= r["iou"] <= 1 for r in seg)
    assert 0 <= summary["specialised_share_last2"] <= 1 and "label_agreement" in summary
    assert pq.read_table(run / "shapes_models.parquet").num_rows == len(summary)


# CI's small validation: 2 fresh seeds (201, 202: used by nothing else) x 500 scenes, the CLI's defaults end to end.
# Thresholds fixed before this test was first run, looser than the full validation's targets (3 seeds x 2,000
# scenes: mean agreement >= 0.85, no seed under 0.75) because 500 scenes give noisier ground truth.
SMALL_MEAN_AGREEMENT = 0.70     # chance is 1 in 6
SMALL_MIN_AGREEMENT = 0.50
SMALL_LABELLED = 0.60           # share of specialised heads that get any label
SMALL_P4_LIFT = 0.20            # property search beats chance
SMALL_STABILITY = 0.50          # TextSpan's top-5 picks shared by two halves of the images
SEGMENTATION_MARGIN = 0.15      # mIoU above the same maps with their patches shuffled
DESCRIBE_MARGIN = 0.10          # an image's first 3 description texts are true of it this much above their base rate
                                # (fixed before any description figure was looked at)


@pytest.fixture(scope="module")
def small_validation(tmp_path_factory):
    from compute.shapes.validate import validate
    return validate(tmp_path_factory.mktemp("validate"), seeds=2, n=500, seed_base=201, progress=False)


def test_small_validation_on_fresh_seeds(small_validation):
    s = small_validation["summary"]
    assert s["specialised_heads"]["min"] >= 6
    assert s["label_agreement"]["mean"] >= SMALL_MEAN_AGREEMENT and s["label_agreement"]["min"] >= SMALL_MIN_AGREEMENT
    assert s["labelled_specialised"]["mean"] >= SMALL_LABELLED
    assert s["property_p4_lift"]["mean"] >= SMALL_P4_LIFT
    assert s["textspan_stability"]["mean"] >= SMALL_STABILITY
    assert s["segmentation_miou"]["mean"] >= s["segmentation_miou_shuffled"]["mean"] + SEGMENTATION_MARGIN
    assert s["describe_precision_at_3"]["min"] >= s["describe_chance_at_3"]["mean"] + DESCRIBE_MARGIN


def test_validation_writes_its_report(small_validation, tmp_path_factory):
    from compute.shapes.validate import format_report
    assert small_validation["seeds"] == [201, 202]
    text = format_report(small_validation)
    assert "label_agreement" in text and "seed 201" in text


def test_demo_uses_the_cli_defaults():
    """No hidden tuning: the demo passes no setting that the CLI does not use by default."""
    import inspect

    from compute.shapes import pipeline as demo
    src = inspect.getsource(demo.build_shapes_store)
    for call in ("run_textspan(str(run), progress=progress)", "run_label(str(run))",
                 "ComputeConfig(model, str(data), str(run), layers=layers, limit=limit)", 'model: str = "shapes"',
                 "layers: str = ComputeConfig.layers", "limit: int | None = None"):
        assert call in src
    # the demo sets only which model, which scenes and how many (the zoo's runs use the first half of them)
    from compute import demo as demo_module
    calls = inspect.getsource(demo_module.build_demo_store)
    assert "layers=" not in calls and "neurons=" not in calls
