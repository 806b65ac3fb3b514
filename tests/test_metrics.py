"""Labels, property vectors, metrics and the leaderboard, on inputs with known answers."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from compute.cli import main
from compute.errors import AtlasError
from compute.jobs.label import UNLABELLED, HeadLabel, majority, run_label
from compute.jobs.metrics import (ablation_cosine, association, entanglement, leaderboard, run_metrics,
                                  textspan_reconstruction)
from compute.shapes.groundtruth import chance_level, precision_at_k, specialisation
from compute.store.layout import RunStore
from compute.store.readers import read_head


def L(prop, conf=1.0, layer=0, head=0):
    return HeadLabel(layer, head, prop, 1.0, "tags", conf)


def test_majority():
    assert majority([["colors"], ["colors", "vehicles"], ["vehicles"], ["colors"]]) == ("colors", 0.75)
    assert majority([["a"], ["b"]]) == ("a", 0.5)              # tie: the earlier pick wins
    assert majority([[], []]) == (UNLABELLED, 0.0)
    assert majority([]) == (UNLABELLED, 0.0)


def test_association_and_entanglement_known_answers():
    distinct = [L("colors", 1.0), L("shapes", 0.5), L("animals", 0.75), L("weather", 0.75)]
    assert association(distinct) == pytest.approx(0.75)
    assert entanglement(distinct) == 0.0
    same = [L("colors")] * 4
    assert entanglement(same) == 1.0
    # two pairs: each head shares with 1 of 3 others
    assert entanglement([L("a"), L("a"), L("b"), L("b")]) == pytest.approx(1 / 3)
    # unlabelled heads do not count
    assert association([L("a", 0.5), L(UNLABELLED, 0.0)]) == 0.5
    assert np.isnan(entanglement([L("a")]))


def test_ablation_cosine_known_answers():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(50, 8))
    constant = np.tile(rng.normal(size=8), (50, 1))
    assert ablation_cosine(e, constant) == pytest.approx(1.0)          # a constant part has no effect
    assert ablation_cosine(e, e) < 0.5                                 # ablating everything destroys it


def test_textspan_reconstruction_is_exact_with_a_full_basis():
    rng = np.random.default_rng(1)
    C = rng.normal(size=(2, 30, 6))
    basis = np.stack([np.linalg.qr(rng.normal(size=(6, 6)))[0].T] * 2)
    np.testing.assert_allclose(textspan_reconstruction(C, basis), C, atol=1e-12)
    np.testing.assert_allclose(textspan_reconstruction(C, basis[:, :0]), np.broadcast_to(C.mean(1, keepdims=True), C.shape))


def test_precision_chance_and_specialisation_known_answers():
    values = np.array([0, 1] * 20)
    C = np.stack([values * 10.0, np.zeros(40)], 1) + np.random.default_rng(0).normal(scale=0.01, size=(40, 2))
    assert precision_at_k(C, values) == 1.0
    assert chance_level(values) == pytest.approx(19 / 39)
    assert specialisation({"color": 0.9, "shape": 0.1}) == "color"
    assert specialisation({"color": 0.5, "shape": 0.4}) is None       # not clearly one attribute
    assert specialisation({"color": 0.2, "shape": 0.0}) is None       # too weak


def test_labels_and_property_vectors(shapes_run):
    run, m = shapes_run
    props = pq.read_table(run / "properties.parquet").to_pylist()
    assert len(props) == len(m["head_layers"]) * m["heads"]
    texts = pq.read_table(run / "texts.parquet").to_pylist()
    spans = pq.read_table(run / "textspan.parquet").to_pylist()
    for p in props:   # the label is the majority tag of the head's texts, or unlabelled (halves disagree)
        ids = [r["text_id"] for r in sorted(spans, key=lambda r: r["rank"]) if (r["layer"], r["head"]) == (p["layer"], p["head"])]
        vote, share = majority([texts[i]["tags"] for i in ids])
        assert p["property"] in (vote, UNLABELLED) and p["share"] == pytest.approx(share)
        assert (0 < p["confidence"] <= 1) == (p["property"] != UNLABELLED)
    store = RunStore(run)
    prop = next((p["property"] for p in props if p["property"] != UNLABELLED), None)
    if prop is None:
        pytest.skip("no head of the random model got a stable label")
    heads = [(p["layer"], p["head"]) for p in props if p["property"] == prop]
    ids, vec = read_head(store, *heads[0])
    expected = np.mean([read_head(store, l, h)[1] for l, h in heads], 0)
    got = duckdb.connect().execute("SELECT image_id, vector FROM read_parquet(?) ORDER BY image_id",
                                   [str(store.property_dir(prop) / "*.parquet")]).fetchall()
    assert [g[0] for g in got] == ids.tolist()
    np.testing.assert_allclose(np.array([g[1] for g in got]), expected, atol=1e-6)


def test_metrics_and_leaderboard(shapes_run, capsys):
    run, _ = shapes_run
    table = run_metrics(str(run), progress=False).to_pylist()
    model = {r["metric"]: r["value"] for r in table if r["scope"] == "model"}
    for k in ("association", "entanglement", "variance_explained", "textspan_reconstruction_cosine", "zero_shot_accuracy"):
        assert k in model and np.isfinite(model[k])
    layers = {(r["metric"], r["layer"]) for r in table if r["scope"] == "layer"}
    assert ("ablation_cosine_attn", 0) in layers and ("ablation_cosine_mlp", 5) in layers
    metrics, rows = leaderboard(run.parent)
    assert rows[0]["run"] == run.name and "association" in metrics
    assert main(["leaderboard", str(run.parent)]) == 0
    assert "association" in capsys.readouterr().out


def test_leaderboard_of_empty_store(tmp_path, capsys):
    assert main(["leaderboard", str(tmp_path)]) == 2
    assert "no runs with metrics" in capsys.readouterr().err


class _FakeChat(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeChat.seen.append((self.headers.get("Authorization"), body))
        answer = "shape" if any("circle" in m["content"] for m in body["messages"][-1:]) else "color"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_labelling_against_a_local_server(shapes_run, monkeypatch):
    run, m = shapes_run
    server = HTTPServer(("127.0.0.1", 0), _FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CLIP_ATLAS_LLM_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("CLIP_ATLAS_LLM_MODEL", "test-model")
        monkeypatch.setenv("CLIP_ATLAS_LLM_KEY", "sk-secret")
        labels = run_label(str(run), "llm")
    finally:
        server.shutdown()
        run_label(str(run), "tags")   # leave the shared run as the other tests expect it
    assert len(labels) == len(m["head_layers"]) * m["heads"]
    assert {x.property for x in labels} <= {"shape", "color"} and all(x.method == "llm" for x in labels)
    auth, body = _FakeChat.seen[-1]
    assert auth == "Bearer sk-secret" and body["model"] == "test-model"


def test_llm_method_is_off_unless_configured(shapes_run, monkeypatch):
    monkeypatch.delenv("CLIP_ATLAS_LLM_URL", raising=False)
    with pytest.raises(AtlasError, match="CLIP_ATLAS_LLM_URL"):
        run_label(str(shapes_run[0]), "llm")


def test_similarity_labels_for_an_untagged_pool(shapes_run, tmp_path):
    """An untagged pool is labelled through the text encoder against a tagged reference pool."""
    from compute.jobs.label import label_by_similarity
    from compute.store.layout import RunStore
    run, m = shapes_run
    labels = label_by_similarity(RunStore(run), reference="shapes")
    assert len(labels) == len(m["head_layers"]) * m["heads"]
    assert {x.property for x in labels} <= {"color", "shape", "pattern", "size", "position", "background", UNLABELLED}
    assert all(0 <= x.confidence <= 1 and x.method == "similarity" for x in labels)
    assert all((x.confidence == 0) == (x.property == UNLABELLED) for x in labels)


def test_shuffled_tag_pvalue_known_answers():
    from compute.jobs.label import shuffled_tag_pvalue
    tags = [["a"]] * 10 + [["b"]] * 90
    # all 5 texts tagged 'a' when a tenth of the pool is: C(10,5)/C(100,5), far below the null's resolution
    assert shuffled_tag_pvalue(tags, [0, 1, 2, 3, 4], "a") == pytest.approx(1 / 2001)
    # texts tagged 'b' as often as the pool's share: no evidence at all
    assert shuffled_tag_pvalue(tags, [10, 11, 12, 13, 14, 0, 1, 15, 16, 17], "b") > 0.5
    assert shuffled_tag_pvalue(tags, [], "a") == 1.0 and shuffled_tag_pvalue(tags, [0], "zzz") == 1.0


def test_a_label_needs_both_halves_of_the_images_to_agree(shapes_run, monkeypatch):
    """The gate: a head whose halves' picks vote for another property is unlabelled; when they agree it keeps it."""
    from compute.jobs import label as properties
    from compute.store.layout import RunStore
    store = RunStore(shapes_run[0])
    _, tags, _ = properties.read_texts(store)
    texts = properties.head_texts(store)
    agree = {k: (ids, ids) for k, ids in texts.items()}
    labels = properties.stable_labels(store, tags, "tags")
    monkeypatch.setattr(properties, "half_picks", lambda s: agree)
    kept = properties.stable_labels(store, tags, "tags")
    assert all(x.property == majority([tags[i] for i in texts[(x.layer, x.head)]])[0] for x in kept)
    assert sum(x.property != UNLABELLED for x in kept) >= sum(x.property != UNLABELLED for x in labels)
    # one half voting for a property nobody picked: every head loses its label
    other = next(i for i, t in enumerate(tags) if t and t[0] == "size")
    monkeypatch.setattr(properties, "half_picks", lambda s: {k: (ids, [other] * len(ids)) for k, ids in texts.items()})
    flipped = properties.stable_labels(store, tags, "tags")
    assert all(x.property in (UNLABELLED, "size") for x in flipped)
    assert all(x.property == UNLABELLED for x in flipped if majority([tags[i] for i in texts[(x.layer, x.head)]])[0] != "size")


def test_heads_with_fewer_texts_keep_their_own_directions():
    """TextSpan stops early on a head whose variance is spent: a SigLIP-style organism's run had heads with 9 texts
    beside heads with 10, and the metrics job assumed one count. Each head's projection uses its own texts."""
    import pyarrow as pa

    from compute.jobs.metrics import head_directions, textspan_reconstruction_around
    from compute.store.layout import vectors
    rng = np.random.default_rng(0)
    counts = {(5, 0): 3, (5, 1): 1, (4, 2): 2}
    rows, dirs = [], []
    for (layer, head), k in counts.items():
        q, _ = np.linalg.qr(rng.normal(size=(6, k)))
        for r in range(k):
            rows.append((layer, head, r, 0.1 * (r + 1)))
            dirs.append(q[:, r])
    table = pa.table({"layer": [r[0] for r in rows], "head": [r[1] for r in rows], "rank": [r[2] for r in rows],
                      "cumulative_variance": [r[3] for r in rows], "direction": vectors(np.array(dirs))})
    pairs, D, last = head_directions(table)
    assert pairs == [(4, 2), (5, 0), (5, 1)] and D.shape == (3, 3, 6)
    assert [r["cumulative_variance"] for r in last] == pytest.approx([0.2, 0.3, 0.1])
    C = rng.normal(size=(3, 4, 6))
    mean = C.mean(1, keepdims=True)
    got = textspan_reconstruction_around(C, mean, D)
    for p, (layer, head) in enumerate(pairs):          # reference: project on that head's own k directions
        Q = np.array([d for (l, h, _, _), d in zip(rows, dirs) if (l, h) == (layer, head)])
        assert np.allclose(got[p], mean[p] + (C[p] - mean[p]) @ Q.T @ Q, atol=1e-5)
