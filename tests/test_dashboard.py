"""Every page through AppTest on a small Shapes store: what is shown, uploads, query params, bad input."""
from __future__ import annotations

import io
import re
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "dashboard" / "app.py")
PAGES = ["views/leaderboard.py", "views/atlas.py", "views/property_search.py", "views/topic_segmentation.py",
         "views/contrastive.py", "views/image_neighbours.py", "views/text_neighbours.py", "views/neurons.py", "views/head.py", "views/compare.py",
         "views/describe.py", "views/intervene.py"]


def with_metrics(shapes_run) -> Path:
    """The shared small run, with its metrics table (the leaderboard and compare pages read it)."""
    from compute.jobs.metrics import run_metrics
    run, _ = shapes_run
    if not (run / "metrics.parquet").is_file():
        run_metrics(str(run), progress=False)
    return run


@pytest.fixture(scope="module")
def store(shapes_run, tmp_path_factory):
    run = with_metrics(shapes_run)
    root = tmp_path_factory.mktemp("dash")
    shutil.copytree(run, root / run.name)
    # a run that is still computing, and a folder with a malformed manifest: both shown as skipped
    partial = root / "zz-partial"
    shutil.copytree(run, partial)
    m = json.loads((partial / "manifest.json").read_text())
    (partial / "manifest.json").write_text(json.dumps({**m, "status": "partial"}))
    (root / "zz-broken").mkdir()
    (root / "zz-broken" / "manifest.json").write_text("{not json")
    return root


def app(store: Path, page: str | None = None, **params) -> AppTest:
    import os
    os.environ["CLIP_ATLAS_STORE"] = str(store)
    at = AppTest.from_file(APP, default_timeout=120)
    at.query_params.update({k: str(v) for k, v in params.items()})
    at.run()
    if page:
        at.switch_page(page)
        at.run()
    return at


def png_bytes(size=(64, 64), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(store, page):
    at = app(store, page)
    assert not at.exception, at.exception
    assert at.title[0].value
    warnings = " ".join(w.value for w in at.warning)
    if page != "views/leaderboard.py":
        assert "zz-partial" in warnings and "zz-broken" in warnings


#: a hand-edited or truncated URL: every parameter any page reads, with values no control would produce
GARBAGE = dict(a="", b="{}", ablate="99.99,x", alpha="nan", glabel="\x01", gpage="-3", gsearch="%_'\"", head="999",
               heads="a,b", htext="", image="-1", k="-5", layer="-1", neuron="1e9", nlayer="x", ntext="", order="drop",
               prop="??", property="", q="'; DROP TABLE x", run="../../etc", runs=",,,", src="nope", text="", tpl="{0} {1}")


@pytest.mark.parametrize("page", PAGES)
def test_garbage_in_the_url_is_never_an_exception(store, page):
    at = app(store, page, **GARBAGE)
    assert not at.exception, at.exception
    assert all("\n" not in e.value and "Traceback" not in e.value for e in at.error)
    for slider in at.slider:      # out-of-range or NaN numbers fall back or are clamped into the control's range
        if slider.key in ("alpha", "k", "dk"):
            assert slider.value == {"alpha": 0.55, "k": 1, "dk": 3}[slider.key], slider.key


def test_leaderboard_shows_runs_and_metrics(store):
    at = app(store)
    assert at.title[0].value == "Leaderboard"
    metrics = at.dataframe[0].value
    assert {"rank", "family", "pool", "layers x heads", "parameters", "training", "association",
            "entanglement", "labelled_share"} <= set(metrics.columns)
    runs = at.dataframe[-1].value
    assert "shapes-random" in set(runs["run"]) and "zz-partial" in set(runs["run"])
    assert any(b.label.startswith("Download leaderboard") for b in at.get("download_button"))


def test_leaderboard_ranks_by_any_metric(store, tmp_path):
    """Two runs whose metrics differ: ranked by a higher-is-better metric descending, a lower-is-better ascending,
    the choice kept in the URL."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    root = tmp_path / "board"
    src = next(p for p in store.iterdir() if p.name == "shapes-random")
    shutil.copytree(src, root / "a-run")
    shutil.copytree(src, root / "b-run")
    t = pq.read_table(root / "b-run" / "metrics.parquet")
    bump = pc.if_else(pc.equal(t["scope"], "model"), pc.multiply(t["value"], 2.0), t["value"])
    pq.write_table(t.set_column(t.schema.get_field_index("value"), "value", bump), root / "b-run" / "metrics.parquet")
    at = app(root, rank="association")
    assert at.dataframe[0].value["run"].tolist() == ["b-run", "a-run"]
    at = app(root, rank="entanglement")
    assert at.selectbox[0].value == "entanglement"
    assert at.dataframe[0].value["run"].tolist() == ["a-run", "b-run"]


def test_atlas_head_from_query_params(store):
    at = app(store, "views/atlas.py", layer=5, head=3)
    assert at.selectbox(key="layer").value == 5 and at.selectbox(key="head").value == 3
    assert any("L5.H3" in m.value for m in at.markdown)


def test_head_page_by_url(store):
    at = app(store, "views/head.py", layer=5, head=3)
    assert not at.exception
    assert any("Layer 5, head 3" in h.value for h in at.subheader)
    assert at.metric[0].label == "property" and at.metric[2].label == "stability"
    assert any("Furthest along" in m.value for m in at.markdown)
    # 8 top + 8 bottom + picked image's overlay + colour bar + 8 neighbours
    assert len(at.get("image")) >= 8 + 8 + 2 + 8
    assert at.text_input(key="htext").value                         # seeded with the head's first text


def test_image_neighbours_gallery_and_upload(store):
    at = app(store, "views/image_neighbours.py")
    assert any("Top 8" in h.value for h in at.subheader)
    assert at.query_params["image"]
    at.radio(key="img_src").set_value("Upload").run()
    at.file_uploader[0].set_value(("red.png", png_bytes(), "image/png")).run()
    assert not at.exception and any("Top 8" in h.value for h in at.subheader)


@pytest.mark.parametrize("payload,message", [
    (b"this is not an image", "not a usable image"),
    (png_bytes()[:60], "not a usable image"),
])
def test_bad_uploads_show_a_message(store, payload, message):
    at = app(store, "views/image_neighbours.py", src="upload")
    at.file_uploader[0].set_value(("bad.png", payload, "image/png")).run()
    assert not at.exception
    assert any(message in e.value for e in at.error)


def test_upload_over_the_pixel_limit_is_refused(store, monkeypatch):
    from dashboard import live
    monkeypatch.setattr(live, "MAX_UPLOAD_PIXELS", 1000)
    at = app(store, "views/image_neighbours.py", src="upload")
    at.file_uploader[0].set_value(("big.png", png_bytes((100, 100)), "image/png")).run()
    assert any("too large" in e.value for e in at.error)


@pytest.mark.parametrize("text,message", [
    ("", "enter a text"),
    ("x" * 10_000, "characters long"),
])
def test_odd_text_shows_a_message(store, text, message):
    at = app(store, "views/text_neighbours.py")
    at.text_input(key="query_text").set_value(text).run()
    assert not at.exception
    assert any(message in e.value for e in at.error)


def test_sql_like_text_is_just_text(store):
    at = app(store, "views/text_neighbours.py")
    at.text_input(key="query_text").set_value("'); DROP TABLE images; --").run()
    assert not at.exception and not at.error
    assert any("Top" in h.value for h in at.subheader)


def test_text_neighbours_suggestion_fills_the_box(store):
    at = app(store, "views/text_neighbours.py", layer=4, head=1)
    suggestion = at.button[1].label
    at.button[1].click().run()
    assert at.text_input(key="query_text").value == suggestion
    assert at.query_params["text"] == suggestion


def test_topic_and_contrastive_segmentation(store):
    at = app(store, "views/topic_segmentation.py", text="a blue square", heads="5,2")
    assert not at.exception and at.selectbox(key="map_heads").value == "L5.H2"
    assert len(at.get("image")) >= 3          # image, overlay, colour bar
    at = app(store, "views/contrastive.py", a="a circle", b="a square")
    assert not at.exception and len(at.get("image")) >= 5


def multiples(at) -> list[str]:
    """The captions of the page's small multiples: the head maps (in rows of four), captioned 'L5.H1 · +12.3%'."""
    return [x.caption for i in at.get("image") for x in i.proto.imgs if re.match(r"L\d+\.H\d+ · ", x.caption or "")]


def test_segmentation_pages_rank_heads_and_take_an_opacity(store):
    at = app(store, "views/topic_segmentation.py", text="a blue square", alpha=0.3)
    assert not at.exception and at.sidebar.slider(key="alpha").value == 0.3
    caps = multiples(at)
    assert len(caps) == 8 and all(c.startswith("L") and c.endswith("%") for c in caps)
    shares = [float(c.split("·")[1].strip(" %")) for c in caps]
    assert shares == sorted(shares, reverse=True)
    at.slider(key="which_k").set_value(3).run()
    assert len(multiples(at)) == 3
    at.toggle[0].set_value(True).run()
    assert all("±" in c for c in multiples(at))
    at.sidebar.slider(key="alpha").set_value(0.8).run()
    assert at.query_params["alpha"] == "0.8"
    assert any(b.label.startswith("Download head shares") for b in at.get("download_button"))
    assert any(b.label == "Download these maps (PNG)" for b in at.get("download_button"))
    at = app(store, "views/contrastive.py", a="a circle", b="a square")
    assert not at.exception and len(multiples(at)) == 8
    assert any("rather than" in h.value for h in at.subheader)


def test_describe_page(store):
    at = app(store, "views/describe.py", k=5)
    assert not at.exception and at.slider(key="dk").value == 5
    assert len(at.get("arrow_vega_lite_chart")) == 1 or len(at.get("vega_lite_chart")) == 1
    bold = [m.value for m in at.markdown if m.value.startswith("**")]
    assert len(bold) == 3                       # the first three texts, each with the heads behind it
    assert at.dataframe[0].value.score.is_monotonic_decreasing
    labels = [b.label for b in at.get("download_button")]
    assert "Download description (CSV)" in labels and "Download every head and text (CSV)" in labels


def test_intervene_page_heads_and_property(store):
    at = app(store, "views/intervene.py", ablate="5.1,4.2")
    assert not at.exception, at.exception
    assert at.radio(key="imode").value == "Chosen heads" and at.multiselect(key="iheads").value == ["L5.H1", "L4.H2"]
    names = [m.label for m in at.metric]
    assert names[0] == "zero-shot accuracy, as is" and names[1] == "with 2 heads mean-ablated"
    assert at.metric[0].value.endswith("%") and at.metric[1].value.endswith("%")
    assert any(m.value.startswith("Predicted **") for m in at.markdown)
    captions = [x.caption for i in at.get("image") for x in i.proto.imgs]
    assert any(c.endswith(", as is") for c in captions) and any(c.endswith("heads ablated") for c in captions)
    assert at.text_input(key="itpl").value == "a {}"             # the Shapes template
    at.multiselect(key="iheads").set_value([]).run()
    assert not at.exception and any("Pick heads" in i.value for i in at.info)
    assert at.metric[1].value == at.metric[0].value
    at.text_input(key="itpl").set_value("no placeholder").run()
    assert any("needs a {}" in e.value for e in at.error)


def test_intervene_shows_where_the_gap_between_two_labels_lives(store):
    at = app(store, "views/intervene.py", ablate="5.1")
    assert not at.exception, at.exception
    shown = {m.label: m.value for m in at.metric}
    assert {"margin gap", "carried by heads", "by MLPs", "by the rest"} <= set(shown)
    shares = [float(shown[k].rstrip("%")) for k in ("carried by heads", "by MLPs", "by the rest")]
    assert abs(sum(shares) - 100) <= 2                                    # rounded percentages of one whole
    worse, better = at.selectbox(key="gworse").value, at.selectbox(key="gbetter").value
    assert worse != better and at.query_params["gw"] == worse and at.query_params["gb"] == better
    again = app(store, "views/intervene.py", ablate="5.1", gw=better, gb=worse)   # the choice comes back from a link
    assert again.selectbox(key="gworse").value == better and again.selectbox(key="gbetter").value == worse


def test_intervene_on_a_run_without_labels_explains(store, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    src = next(p for p in store.iterdir() if p.name.startswith("shapes"))
    run = tmp_path / "s" / src.name
    shutil.copytree(src, run)
    for f in (run / "images").glob("*.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.nulls(t.num_rows, pa.string())), f)
    at = app(tmp_path / "s", "views/intervene.py", ablate="5.1")
    assert not at.exception
    assert any("at least two labels" in e.value for e in at.error)


def test_property_search(store):
    at = app(store, "views/property_search.py", k=3)
    assert not at.exception
    assert any("Nearest by" in h.value for h in at.subheader)


def test_missing_store_is_explained(tmp_path):
    at = app(tmp_path / "nowhere", "views/atlas.py")
    assert not at.exception and any("No complete run" in i.value for i in at.info)


def test_sessions_keep_their_own_state(store):
    a = app(store, "views/atlas.py", layer=4, head=2)
    b = app(store, "views/atlas.py", layer=5, head=7)
    a.selectbox(key="head").set_value(6).run()
    b.run()
    assert (a.selectbox(key="layer").value, a.selectbox(key="head").value) == (4, 6)
    assert (b.selectbox(key="layer").value, b.selectbox(key="head").value) == (5, 7)
    assert a.query_params["head"] == "6" and b.query_params["head"] == "7"


def test_neurons_page_table_detail_and_map(store):
    at = app(store, "views/neurons.py", neuron=7)
    assert not at.exception
    assert at.selectbox(key="nlayer").value == 4
    table = at.dataframe[0].value
    assert len(table) == 200 and table["mean_norm"].is_monotonic_decreasing
    assert any("Neuron 7 of MLP layer 4" in h.value for h in at.subheader)
    assert at.metric[0].value != "" and "L5.H" in at.metric[3].value
    assert len(at.get("image")) >= 3 + 8     # 8 top images, the picked image, its overlay, the colour bar
    at.text_input(key="nquery").set_value("water").run()
    assert not at.exception and "score" in at.dataframe[0].value.columns
    assert at.query_params["q"] == "water"


def test_neurons_page_without_tables_explains(store, tmp_path):
    import shutil
    root = tmp_path / "s"
    src = next(p for p in store.iterdir() if p.name.startswith("shapes"))
    shutil.copytree(src, root / src.name)
    shutil.rmtree(root / src.name / "neurons")
    at = app(root, "views/neurons.py")
    assert not at.exception and any("clip-atlas neurons" in i.value for i in at.info)


def test_head_page_links_neurons_of_the_head(store):
    at = app(store, "views/head.py", layer=5, head=0)
    assert not at.exception
    assert any("flows mainly through this head" in h.value for h in at.subheader)


def test_non_image_message_is_plain(store):
    at = app(store, "views/image_neighbours.py", src="upload")
    at.file_uploader[0].set_value(("notes.txt", b"hello, not pixels", "text/plain")).run()
    msg = " ".join(e.value for e in at.error)
    assert "not an image file" in msg and "0x" not in msg and "<" not in msg


@pytest.mark.parametrize("size", [(1, 5000), (5000, 1), (1, 1), (3, 900)])
def test_extreme_images_work(store, size):
    at = app(store, "views/topic_segmentation.py", src="upload")
    at.file_uploader[0].set_value(("strip.png", png_bytes(size), "image/png")).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert len(at.get("image")) >= 3


def test_scores_are_readable_with_the_raw_value_on_hover(store):
    at = app(store, "views/image_neighbours.py")
    caps = [c for c in at.caption if c.value.startswith("cos ")]
    assert len(caps) == 8
    assert all(-1 <= float(c.value.split()[1]) <= 1 for c in caps)
    assert all("dot product" in c.help for c in caps)


@pytest.fixture(scope="module")
def two_runs(shapes_run, tmp_path_factory):
    """The small run twice, the second with a head relabelled, so the comparison has something to show."""
    import pyarrow.parquet as pq
    run = with_metrics(shapes_run)
    root = tmp_path_factory.mktemp("two")
    shutil.copytree(run, root / "run-a")
    shutil.copytree(run, root / "run-b")
    t = pq.read_table(root / "run-b" / "properties.parquet").to_pandas()
    t.loc[0, "property"] = "relabelled"
    t.to_parquet(root / "run-b" / "properties.parquet", index=False)
    return root


def test_compare_page(two_runs):
    from compute import api
    at = app(two_runs, "views/compare.py")
    assert not at.exception
    assert at.multiselect(key="runs").value == ["run-a", "run-b"]
    metrics = at.dataframe[0].value
    assert list(metrics.columns) == ["run-a", "run-b"] and (metrics["run-a"] == metrics["run-b"]).all()
    counts = at.dataframe[1].value
    cmp = api.compare(two_runs, ["run-a", "run-b"])
    assert counts.loc["relabelled", "run-b"] == 1 and counts.loc["relabelled", "run-a"] == 0
    assert (cmp.heads_per_property().sum() == len(cmp.properties) / 2).all()
    prop = at.selectbox(key="prop").value
    assert at.query_params["prop"] == prop and at.query_params["runs"] == "run-a,run-b"
    assert any(f"labelled “{prop}”" in h.value for h in at.subheader)
    assert len(at.get("download_button")) == 2


def test_compare_page_needs_two_runs(store):
    at = app(store, "views/compare.py")
    assert not at.exception and any("two complete runs" in i.value for i in at.info)


def test_gallery_pages_filters_and_picks(store):
    at = app(store, "views/image_neighbours.py")
    first = at.query_params["image"]
    assert len([b for b in at.button if b.key and b.key.startswith("img_pick_")]) == 12
    at.number_input(key="img_gpage").set_value(2).run()
    assert at.query_params["gpage"] == "2"
    pick = [b for b in at.button if b.key and b.key.startswith("img_pick_")][3]
    pick.click().run()
    chosen = pick.key.removeprefix("img_pick_")
    assert at.query_params["image"] == chosen != first
    assert not at.exception and any("Top 8" in h.value for h in at.subheader)
    # a label filter and a search narrow the grid; a literal % matches nothing rather than everything
    label = at.selectbox(key="img_glabel").options[1]
    at.selectbox(key="img_glabel").set_value(label).run()
    assert at.query_params["glabel"] == label
    at.text_input(key="img_gsearch").set_value("%").run()
    assert any("No image matches" in c.value for c in at.caption)
    # the URL keeps the pick on a fresh visit
    again = app(store, "views/image_neighbours.py", image=chosen)
    assert again.query_params["image"] == chosen


def test_gallery_query_filters(store):
    from compute.store.query import Store
    s = Store(store)
    run = next(r for r in s.runs() if r.ok)
    n = s.image_count(run)
    assert s.gallery_count(run) == n and len(s.gallery(run, limit=n + 5)) == n
    label = s.labels(run)[0]
    assert all(r[2] == label for r in s.gallery(run, limit=100, label=label))
    assert s.gallery_count(run, search=label.upper()) >= s.gallery_count(run, label=label)
    assert s.gallery_count(run, search="%") == 0 and s.gallery_count(run, search="_") == 0


def test_exports_on_every_result(store):
    at = app(store, "views/head.py", layer=5, head=2)
    labels = [b.label for b in at.get("download_button")]
    assert sum("(CSV)" in x for x in labels) == 4 and sum("(PNG)" in x for x in labels) == 1
    for page in ("views/image_neighbours.py", "views/text_neighbours.py", "views/property_search.py",
                 "views/topic_segmentation.py", "views/contrastive.py", "views/neurons.py", "views/leaderboard.py",
                 "views/describe.py", "views/intervene.py"):
        at = app(store, page)
        assert not at.exception and at.get("download_button"), page


def test_one_colour_per_property_on_every_chart():
    """The atlas's property grid and the ground-truth grid gave one attribute two colours: a name's colour is now
    fixed, whatever else a chart shows, a plural shares its singular's, and unlabelled heads are grey."""
    from dashboard.charts import property_colour, property_scale
    assert property_colour("color") == property_colour("colors") != property_colour("background")
    assert property_colour("unlabelled") == "#bab0ac"
    a = property_scale(["background", "color", "unlabelled"]).to_dict()
    b = property_scale(["shape", "color", "mixed", "background", "pattern"]).to_dict()
    colour_a, colour_b = dict(zip(a["domain"], a["range"])), dict(zip(b["domain"], b["range"]))
    assert colour_a["color"] == colour_b["color"] and colour_a["background"] == colour_b["background"]
    assert len(set(colour_b.values())) == len(colour_b)
    assert a["domain"][-1] == "unlabelled"                                  # greys last in the legend
    assert property_colour("some new tag") == property_colour("some new tag")
