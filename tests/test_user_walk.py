"""Regressions from a new user's walk of the dashboard: each test failed on the code before its fix."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from compute.images import load_image
from tests.test_dashboard import app, multiples, store  # noqa: F401  (the small store fixture)


@pytest.mark.parametrize("a,b", [("a circle", "a circle"), ("A circle", "a circle!"),
                                 ("x" * 90 + " circle", "x" * 90 + " square")])
def test_contrastive_with_texts_that_slug_alike_is_no_crash(store, a, b):  # noqa: F811
    """Download keys were slugs of captions: the same text twice, or texts equal in their first 80 characters,
    raised StreamlitDuplicateElementKey."""
    at = app(store, "views/contrastive.py", a=a, b=b)
    assert not at.exception, at.exception
    keys = [x.proto.id for x in at.get("download_button")]
    assert len(keys) == len(set(keys)) >= 2


def test_intervene_with_a_long_template_is_no_crash(store):  # noqa: F811
    at = app(store, "views/intervene.py", ablate="5.1", tpl="a picture of " + "a very long description " * 4 + "{}")
    assert not at.exception, at.exception


def png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one): IHDR bit depth 16, colour type 2, one unfiltered row each."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG turned white (Pillow's convert clips at 255); 16-bit RGB keeps its high byte."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    grey = tmp_path / "grey16.png"
    Image.fromarray(ramp).save(grey)
    assert Image.open(grey).mode == "I;16"
    out = np.asarray(load_image(grey), np.float64)
    assert out.shape == (64, 64, 3) and abs(out.mean() - 127.5) < 1 and (out == 255).mean() < 0.01
    assert np.allclose(out[..., 0], np.round(ramp / 257.0), atol=1)
    rgb = tmp_path / "rgb16.png"
    rgb.write_bytes(png16_rgb(np.stack([ramp, ramp // 2, 65535 - ramp], -1)))
    out = np.asarray(load_image(rgb), np.float64).reshape(-1, 3).mean(0)
    assert np.allclose(out, [127.5, 63.5, 127.5], atol=1)


def test_an_uploaded_sixteen_bit_png_is_not_white(store):  # noqa: F811
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    at = app(store, "views/image_neighbours.py", src="upload")
    at.file_uploader[0].set_value(("grey16.png", buf.getvalue(), "image/png")).run()
    assert not at.exception and not at.error


def test_neighbours_rank_by_cosine_and_bottom_images_carry_their_sign(store):  # noqa: F811
    """Neighbours were ranked by the raw dot product (large contributions won every query); the head page's
    images furthest against a text showed positive cosines beside negative scores."""
    from compute.store.query import Store
    s = Store(store)
    run = [r for r in s.runs() if r.ok][0]
    q = np.random.default_rng(5).standard_normal(run.manifest["embed_dim"]).astype(np.float32)
    hits = s.head_top_k(run, 5, 2, q, k=6)
    cosines = [c for _, _, c in hits]
    assert cosines == sorted(cosines, reverse=True)
    ids, M = s._matrix(run.layout.heads_glob(5, 2), "contribution")
    cos_all = (M @ q) / (np.linalg.norm(M, axis=1) * np.linalg.norm(q))
    assert abs(cosines[0] - cos_all.max()) < 1e-5
    from compute import api
    view = api.Run(s, run).head(5, 2, k=4)
    if len(view.bottom):
        assert ((view.bottom["score"] <= 0) == (view.bottom["cosine"] <= 0)).all()


def test_a_busy_port_is_an_error_before_any_work(tmp_path, capsys):
    """A second `make demo` printed "Port 8501 is not available" and exited 0."""
    import socket

    from compute.cli import main
    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["demo", "--store", str(tmp_path / "store"), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} is in use" in err and "--port" in err
    assert not (tmp_path / "store").exists()


def test_user_text_shows_as_typed(store):  # noqa: F811
    """Markdown in a user's text rendered (a live link, LaTeX); a plain $ or _ was mangled."""
    from dashboard.common import plain
    assert plain("[x](http://e.com) $a_b$ :red[no]") == r"\[x\]\(http://e.com\) \$a\_b\$ :red\[no\]"
    at = app(store, "views/text_neighbours.py", text="[click](http://e.com) $x$ snake_case")
    assert not at.exception
    heads = [h.value for h in at.subheader]
    assert any(r"\[click\]\(http://e.com\) \$x\$ snake\_case" in h for h in heads), heads


def test_a_huge_template_is_refused_in_one_short_line(store):  # noqa: F811
    at = app(store, "views/intervene.py", tpl="{} {}" + "x" * 10_000)
    assert not at.exception
    assert at.error and all(len(e.value) < 400 for e in at.error)


def test_compare_with_a_run_named_twice_is_a_message(store):  # noqa: F811
    from compute import api
    from compute.errors import AtlasError
    name = [r.name for r in api.Store(store).runs() if r.ok][0] if hasattr(api, "Store") else None
    if name:
        with pytest.raises(AtlasError, match="named twice"):
            api.compare(store, [name, name])
    at = app(store, "views/compare.py", runs=f"{name},{name}")
    assert not at.exception


def test_selections_live_in_the_url(store):  # noqa: F811
    """Heads shown and each map's own scale were lost on reload; they read back from the URL."""
    at = app(store, "views/topic_segmentation.py", text="a blue square", shown=3, own=1)
    assert not at.exception
    assert at.slider(key="which_k").value == 3
    assert [t for t in at.toggle if t.label.startswith("Each map")][0].value is True
    assert len(multiples(at)) == 3


def test_re_sorting_neurons_keeps_the_neuron_shown(store):  # noqa: F811
    """The selected row was kept by position: re-sorting or searching silently showed another neuron."""
    at = app(store, "views/neurons.py")
    table = at.dataframe[0].value
    pick = int(table["neuron"].iloc[4])
    at = app(store, "views/neurons.py", neuron=pick)
    assert any(f"Neuron {pick} of" in h.value for h in at.subheader)
    at.selectbox(key="norder").set_value("neuron").run()
    assert not at.exception
    assert any(f"Neuron {pick} of" in h.value for h in at.subheader)
    at.text_input(key="nquery").set_value("water").run()
    assert any(f"Neuron {pick} of" in h.value for h in at.subheader)


def test_every_neuron_is_reachable_by_index(store):  # noqa: F811
    """Sorting by neuron index reached only the first 200 neurons; rows now page."""
    at = app(store, "views/neurons.py", order="neuron")
    pages = at.selectbox(key="nfrom").options
    assert len(pages) >= 2                      # the Shapes layers have 512 neurons
    at.selectbox(key="nfrom").set_value(pages[-1]).run()
    assert not at.exception and at.dataframe[0].value["neuron"].max() >= 400


def test_a_huge_upload_is_downscaled_once_and_refusals_use_the_apps_limit(monkeypatch):
    """A 6000 x 6000 image took 37-200 s per page; a refusal quoted Pillow's bomb limit, not the app's."""
    from compute.errors import AtlasError
    from dashboard import live
    buf = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 200)).save(buf, format="JPEG", quality=70)
    img = live.decode_upload(buf.getvalue())
    assert max(img.size) == live.DISPLAY_SIDE
    monkeypatch.setattr(live, "MAX_UPLOAD_PIXELS", 10_000_000)
    with pytest.raises(AtlasError, match="too large: 6000 x 6000 pixels, and the dashboard takes up to 10 million"):
        live.decode_upload(buf.getvalue())
