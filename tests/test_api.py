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
    from compute.shapes.pipeline import build_shapes_store
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
    from compute.store.layout import RunStore
    from compute.store.readers import read_head
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
    from compute.maths.segment import heatmap
    first = run.images().iloc[1]
    img = Image.open(first.file).convert("RGB")
    heat = run.segment(int(first.image_id), "a red circle")
    ref = heatmap(run.model.token_maps(img), run.model.encode_texts(["a red circle"])[0])
    assert heat.shape == (8, 8) and np.allclose(heat, ref, atol=1e-6)
    a, b = run.segment(img, "a circle", [(5, 1)]), run.segment(img, "a square", [(5, 1)])
    assert np.allclose(run.contrast(img, "a circle", "a square", [(5, 1)]), a - b, atol=1e-6)


def test_decompose_sums_to_the_embedding(run):
    first = run.images().iloc[2]
    d = api.decompose(run.model, [first.file, Image.open(first.file)], layers="all", token_layers="last1")
    assert d.heads.shape == (2, 6, 8, 128) and d.tokens.shape == (2, 1, 8, 65, 128)
    assert (d.total() - d.embedding).abs().max() < 1e-4
    assert torch.allclose(d.embedding[0], d.embedding[1], atol=1e-6)


def test_which_heads_split_the_map_and_without_leaves_heads_out(run):
    from compute.maths.segment import heatmap, which_heads
    img = Image.open(run.images().file[3]).convert("RGB")
    maps = run.model.token_maps(img)
    t = run.model.encode_texts(["a blue square"])[0]
    shares = which_heads(maps, t)
    assert len(shares) == 6 * 8
    assert np.allclose(sum(h.heat for h in shares), heatmap(maps, t), atol=1e-5)
    assert np.isclose(sum(abs(h.share) for h in shares), 1.0)
    assert all(a.share >= b.share for a, b in zip(shares, shares[1:]))
    assert all(np.isclose(h.score, h.heat.sum(), rtol=1e-4, atol=1e-7) for h in shares)
    top = [(h.layer, h.head) for h in shares[:3]]
    assert [(h.layer, h.head) for h in run.which_heads(img, "a blue square", 3)] == top
    assert np.allclose(run.segment(img, "a blue square", without=top), heatmap(maps, t) - heatmap(maps, t, top), atol=1e-5)


def test_describe_projects_centred_contributions_on_the_textspan_directions(run, shapes_store):
    """Against a plain reference that reads the heads with pyarrow (not the query layer's DuckDB)."""
    import pyarrow.parquet as pq

    from compute.store.layout import RunStore
    from compute.store.readers import read_head
    store = RunStore(shapes_store)
    first = run.images().iloc[7]
    d = run.describe(int(first.image_id), k=5)
    picks = pq.read_table(store.table_path("textspan")).to_pylist()
    ref = {}
    for r in picks:
        ids, c = read_head(store, r["layer"], r["head"])
        row = c[np.searchsorted(ids, first.image_id)].astype(np.float64) - c.astype(np.float64).mean(0)
        ref[(r["layer"], r["head"], r["text"])] = row @ np.asarray(r["direction"], np.float64)
    got = {(r.layer, r.head, r.text): r.score for r in d.pairs.itertuples()}
    assert got.keys() == ref.keys() and all(np.isclose(got[k], ref[k], atol=1e-5) for k in ref)
    assert d.pairs.score.is_monotonic_decreasing and len(d.texts) == 5 and d.texts.score.is_monotonic_decreasing
    for t in d.texts.itertuples():       # a text's score adds its projections over the heads that picked it
        assert np.isclose(t.score, sum(v for (l, h, x), v in ref.items() if x == t.text), atol=1e-5)
        assert len(t.heads) == sum(1 for (l, h, x) in ref if x == t.text)
    live = run.describe(Image.open(first.file), k=5)        # the same image, decomposed live
    assert live.texts.text.tolist() == d.texts.text.tolist() and np.allclose(live.texts.score, d.texts.score, atol=1e-4)


def test_span_scores_reconstruct_the_projection_on_the_span():
    from compute.maths.describe import span_scores
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(16, 4)))
    c, mu = rng.normal(size=16), rng.normal(size=16)
    picks = [(0, 0, j, f"t{j}", q[:, j]) for j in range(4)]
    scores = span_scores({(0, 0): c}, {(0, 0): mu}, picks)
    proj = q @ q.T @ (c - mu)
    assert np.allclose(sum(s.score * q[:, s.rank] for s in scores), proj)
    assert np.isclose(sum(s.share for s in scores), proj @ proj / ((c - mu) @ (c - mu)))


def test_intervene_matches_the_live_ablation_experiment(run, shapes_store):
    """The store-read intervention equals eval/ablation's path: a live forward over the same images."""
    from compute.eval.ablation import GroupedSet, ablated_scores, head_scores
    heads = [(4, 2), (5, 1), (5, 6)]
    iv = run.intervene(heads)
    assert iv.prompts[0] == f"a {iv.classes[0]}"                # the Shapes template, as `eval segmentation` uses
    imgs = run.images().sort_values("image_id")
    data = GroupedSet([Path(f) for f in imgs.file], np.array([iv.classes.index(l) for l in imgs.label]),
                      np.zeros(len(imgs), int), iv.classes, iv.prompts, ["all"])
    hs = head_scores(run.model, data, [4, 5], progress=False)
    assert iv.image_ids.tolist() == imgs.image_id.tolist()
    assert np.allclose(iv.base, hs.base, atol=1e-4)
    assert np.allclose(iv.ablated, ablated_scores(hs, heads, hs.heads.mean(0)), atol=1e-4)
    acc = iv.accuracy.set_index("label")
    assert acc.loc["all images", "images"] == len(imgs)
    assert np.isclose(acc.loc["all images", "ablated"], (iv.ablated.argmax(1) == data.labels).mean())
    assert np.allclose(acc["change"], acc["ablated"] - acc["base"])
    none = run.intervene([])
    assert np.array_equal(none.base, none.ablated) and (none.accuracy.change == 0).all()
    prop = run.intervene("background")
    assert prop.heads == sorted(run.store.heads_with_property(run.info, "background"))
    stored = run.class_scores(int(imgs.image_id.iloc[4]), iv)
    live = run.class_scores(Image.open(imgs.file.iloc[4]), iv)
    assert np.allclose(stored[["base", "ablated"]], live[["base", "ablated"]], atol=1e-4)


def test_margin_gap_splits_exactly_over_components_and_heads(run):
    """The gap between two labels' mean margins is a sum over components; the shares say who carries it. Reference:
    plain numpy over the stored vectors, margins against each image's best other class as is."""
    g = run.margin_gap()
    iv = run.intervene([])
    per = iv.accuracy.set_index("label")["base"].drop("all images")
    assert g.worse == per.idxmin() and g.better == per.idxmax()
    assert np.isclose(g.heads + g.mlp + g.rest, 1.0)
    # the layer parts: attn shares sum to the heads' share, mlp shares to the MLPs'
    assert np.isclose(g.layers[g.layers.part == "attn"].share.sum(), g.heads)
    assert np.isclose(g.layers[g.layers.part == "mlp"].share.sum(), g.mlp)
    # every stored head of a layer sums to that layer's attention share (out-projection bias apart)
    for layer in (2, 5):
        assert np.isclose(g.every_head[g.every_head.layer == layer].share.sum(),
                          g.layers[(g.layers.layer == layer) & (g.layers.part == "attn")].share.iloc[0], atol=1e-6)
    # the total gap by hand
    classes = iv.classes
    labels = run.images().set_index("image_id").loc[iv.image_ids].label.to_numpy()
    y = np.array([classes.index(lab) for lab in labels])
    s = iv.base.copy()
    true = s[np.arange(len(y)), y]
    s[np.arange(len(y)), y] = -np.inf
    margin = true - s.max(1)
    gap = margin[y == classes.index(g.worse)].mean() - margin[y == classes.index(g.better)].mean()
    assert np.isclose(g.gap, gap, rtol=1e-4)
    assert g.gap < 0
    other = run.margin_gap(worse=g.better, better=g.worse)
    assert np.isclose(other.gap, -g.gap, rtol=1e-4)
    with pytest.raises(AtlasError, match="not one of the run's labels"):
        run.margin_gap(worse="unicorn")


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
        (lambda: run.intervene("smell"), "no head of shapes-demo is labelled 'smell'"),
        (lambda: run.intervene([(0, 1)]), "layer 0 is not stored"),
        (lambda: run.intervene([(5, 1)], template="a photo"), "needs a {}"),
        (lambda: run.segment(run.images().path[0], "x", without=[(7, 0)]), "outside a model"),
        (lambda: run.neighbours(run.images().path[0], 5, 2, k=-1), "k must be 0 or more, got -1"),
        (lambda: run.neurons(limit=-1), "limit must be 0 or more, got -1"),
        (lambda: run.search_neurons("red", k=-3), "k must be 0 or more, got -3"),
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
