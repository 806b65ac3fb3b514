"""The notebook API on a small Shapes store: every call, its errors, and docs/api.md executed as written."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compute import api
from compute.errors import AtlasError

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory):
    """The trained Shapes model on 300 fresh scenes (seed 203), every step with the CLI's defaults."""
    from compute.demo import build_shapes_store
    root = tmp_path_factory.mktemp("api")
    return build_shapes_store(root / "data", root / "shapes-demo", 300, seed=203, metrics=False, progress=False)


@pytest.fixture(scope="module")
def run(shapes_store):
    return api.open_run(shapes_store)


def test_heads_table(run):
    h = run.heads()
    assert list(h.columns) == ["layer", "head", "property", "confidence", "texts", "variance_explained", "stability"]
    assert len(h) == 4 * 8 and set(h.layer) == {2, 3, 4, 5}
    assert h.texts.map(len).max() >= 1 and (h.variance_explained.dropna() <= 1).all()
    assert "background" in set(h.property)


def test_head_view_top_and_bottom_follow_the_direction(run, shapes_store):
    from compute.heads import read_head
    from compute.store import RunStore
    h = run.heads()
    layer, head = (int(x) for x in h[h.property == "background"][["layer", "head"]].iloc[0])
    v = run.head(layer, head, k=5)
    assert v.property == "background" and len(v.texts) >= 1 and len(v.top) == 5 == len(v.bottom)
    assert v.top.score.is_monotonic_decreasing and v.bottom.score.is_monotonic_increasing
    ids, c = read_head(RunStore(shapes_store), layer, head)
    d = run.store.head_direction(run.info, layer, head)
    scores = c @ d
    assert v.top.image_id.tolist() == ids[np.argsort(-scores)[:5]].tolist()
    assert v.bottom.image_id.tolist() == ids[np.argsort(scores)[:5]].tolist()


def test_neighbours_agree_for_every_way_of_naming_an_image(run):
    first = run.images().iloc[5]
    by_id = run.neighbours(int(first.image_id), 5, 2, k=4)
    by_path = run.neighbours(first.path, 5, 2, k=4)
    by_file = run.neighbours(first.file, 5, 2, k=4)
    assert by_id.image_id.tolist() == by_path.image_id.tolist() == by_file.image_id.tolist()
    assert int(first.image_id) not in by_id.image_id.tolist()
    # decomposed live, the image gives the stored vector (so the same neighbours, itself aside: it is not left out)
    stored = run.store.stored_head(run.info, int(first.image_id), 5, 2)
    assert np.allclose(run._live_heads(Image.open(first.file).convert("RGB"), (5,))[0, 2], stored, atol=1e-6)
    live = run.neighbours(Image.open(first.file), 5, 2, k=5)
    assert [i for i in live.image_id if i != first.image_id][:4] == by_id.image_id.tolist()


def test_text_and_property_neighbours(run):
    t = run.text_neighbours("a scene on water", 5, 2, k=3)
    assert len(t) == 3 and t.score.is_monotonic_decreasing
    first = run.images().iloc[0]
    stored = run.property_neighbours(int(first.image_id), "background", k=4)
    live = run.property_neighbours(Image.open(first.file), "background", k=5)
    assert [i for i in live.image_id if i != first.image_id][:4] == stored.image_id.tolist()


def test_segment_and_contrast_match_the_maths(run):
    from compute.maths.segment import heatmap, token_maps
    first = run.images().iloc[1]
    img = Image.open(first.file).convert("RGB")
    heat = run.segment(int(first.image_id), "a red circle")
    ref = heatmap(token_maps(run.model, img), run.model.encode_texts(["a red circle"])[0])
    assert heat.shape == (8, 8) and np.allclose(heat, ref, atol=1e-6)
    a, b = run.segment(img, "a circle", [(5, 1)]), run.segment(img, "a square", [(5, 1)])
    assert np.allclose(run.contrast(img, "a circle", "a square", [(5, 1)]), a - b, atol=1e-6)


def test_decompose_sums_to_the_embedding(run):
    first = run.images().iloc[2]
    d = api.decompose(run.model, [first.file, Image.open(first.file)], layers="all", token_layers="last1")
    assert d.heads.shape == (2, 6, 8, 128) and d.tokens.shape == (2, 1, 8, 65, 128)
    assert (d.total() - d.embedding).abs().max() < 1e-4
    assert torch.allclose(d.embedding[0], d.embedding[1], atol=1e-6)


def test_errors_are_one_line(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image here")
    cases = [
        (lambda: api.open_run(tmp_path), "no run at"),
        (lambda: run.neighbours(1, 5, 2), "no image with id 1"),
        (lambda: run.neighbours("nowhere.png", 5, 2), "neither a stored image"),
        (lambda: run.neighbours(str(bad), 5, 2), "not a usable image"),
        (lambda: run.neighbours(0.5, 5, 2), "not float"),
        (lambda: run.neighbours(run.images().path[0], 0, 2), "layer 0 is not stored"),
        (lambda: run.text_neighbours("   ", 5, 2), "enter a text"),
        (lambda: run.property_neighbours(run.images().path[0], "smell"), "no property vectors for 'smell'"),
        (lambda: run.segment(run.images().path[0], "x", [(9, 0)]), "outside a model"),
        (lambda: api.load("ViT-Q-99"), "unknown model"),
        (lambda: api.decompose(run.model, []), "no images"),
    ]
    for call, message in cases:
        with pytest.raises(AtlasError, match=re.escape(message)) as e:
            call()
        assert "\n" not in str(e.value) and "<" not in str(e.value)


def test_docs_api_runs_as_written(shapes_store, capsys):
    """Every ```python block of docs/api.md, in order, on the small store in place of the demo store."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block.replace("artifacts/shapes-demo", str(shapes_store)), str(DOC), "exec"), scope)
    out = capsys.readouterr().out
    assert "background" in out and "score" in out
