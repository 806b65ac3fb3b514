"""Widgets shared by the pages: store and run pickers bound to the URL, the image picker, error display."""
from __future__ import annotations

import contextlib
import io
import re
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import streamlit as st
from PIL import Image, ImageDraw

from compute import api
from compute.errors import AtlasError
from compute.headnames import head_name, parse_head
from compute.render import overlay, symmetric_range
from compute.store.query import DEFAULT_STORE, RunInfo, Store, full_path
from dashboard import live
from dashboard.charts import colour_bar

DISPLAY_PX = 256
MAPS_PER_ROW = 4


def store_root() -> Path:
    """--store PATH after `--` on the streamlit command line, else $CLIP_ATLAS_STORE, else ./artifacts."""
    argv = sys.argv
    if "--store" in argv and argv.index("--store") + 1 < len(argv):
        return Path(argv[argv.index("--store") + 1]).resolve()
    return Path(os.environ.get("CLIP_ATLAS_STORE", DEFAULT_STORE)).resolve()


@st.cache_resource
def store(root: str) -> Store:
    return Store(root)


def current_store() -> Store:
    new_page_run()
    return store(str(store_root()))


def api_run(s: Store, run: RunInfo) -> api.Run:
    """The notebook API's view of a run, with the dashboard's cached model: pages ask their questions through it."""
    return api.Run(s, run, model_loader=live.model)


@st.cache_data(max_entries=16, show_spinner="Scoring the run's images ...")
def intervention(root: str, run_name: str, stamp: float, heads: tuple, template: str | None) -> api.Intervention:
    """`Run.intervene`, cached per run (and its finish time), heads and template."""
    s = store(root)
    return api_run(s, s.run(run_name)).intervene(list(heads), template)


@st.cache_data(max_entries=16, show_spinner="Splitting the gap over the decomposition ...")
def margin_gap(root: str, run_name: str, stamp: float, worse: str, better: str, template: str | None) -> api.MarginGap:
    """`Run.margin_gap`, cached per run (and its finish time), labels and template."""
    s = store(root)
    return api_run(s, s.run(run_name)).margin_gap(worse, better, template)


def show_hits(s: Store, run: RunInfo, hits, score_name: str = "dot product", name: str = "results") -> None:
    """An API result table (image_id, score, cosine, ...) as an image grid, with a CSV download of the table."""
    dots = hits["dot"] if "dot" in hits else hits["score"]
    image_grid(s, run, list(zip(hits["image_id"].tolist(), dots.tolist(), hits["cosine"].tolist())),
               score_name=score_name)
    download_csv(hits.drop(columns=["file"], errors="ignore").rename(columns={"score": score_name.replace(" ", "_")}),
                 name)


def download_csv(df, name: str) -> None:
    """A download button for a result table, as `name`.csv."""
    st.download_button(f"Download {name} (CSV)", df.to_csv(index=False).encode(), f"{slug(name)}.csv", "text/csv",
                       key=unique_key("dl", name), icon=":material/download:")


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")[:80] or "download"


# what markdown, Streamlit's :colour[...] directives, LaTeX and HTML act on inside a line
_MARKDOWN = re.compile(r"([\\`*_\[\]()#|$<>~])")


def plain(text: object, limit: int = 200) -> str:
    """A user's text (a query, a label, a template, a run's name) made safe to show inside markdown: every
    markdown, LaTeX and HTML character escaped, so it shows as typed, and cut to `limit` characters."""
    text = str(text)
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return _MARKDOWN.sub(r"\\\1", text)


_KEYS: dict[str, int] = {}


def new_page_run() -> None:
    """Every page run starts here (start_page, current_store): widget keys count from zero again."""
    _KEYS.clear()


def unique_key(kind: str, name: str) -> str:
    """A widget key unique in this page run by construction: two captions that slug alike (the same text twice,
    texts differing in case or punctuation, long texts sharing their first 80 characters) get -1, -2, ...; the
    same widget keeps its key from run to run, so its state survives."""
    base = f"{kind}_{slug(name)}"
    n = _KEYS.get(base, 0)
    _KEYS[base] = n + 1
    return base if n == 0 else f"{base}-{n}"


def score_caption(score: float, cosine: float | None = None, score_name: str = "dot product") -> tuple[str, str]:
    """(the caption shown, the hover text): the cosine when the score is a similarity, else the score itself."""
    if cosine is not None and cosine == cosine:
        return f"cos {cosine:.2f}", f"cosine {cosine:.4f} · {score_name} {score:.3e}"
    return f"{score:.3g}", f"{score_name} {score:.4e}"


def param(name: str, default=None, cast=str):
    """A query parameter, cast, or the default when absent or malformed."""
    raw = st.query_params.get(name)
    if raw is None:
        return default
    try:
        return cast(raw)
    except (TypeError, ValueError):
        return default


def param_in(name: str, default, low, high, cast=int):
    """A numeric query parameter clamped to [low, high]; the default when absent, malformed or NaN."""
    value = param(name, default, cast)
    if value != value:          # NaN
        return default
    return min(max(value, low), high)


def set_params(**values) -> None:
    for k, v in values.items():
        if v is None:
            st.query_params.pop(k, None)
        elif st.query_params.get(k) != str(v):
            st.query_params[k] = str(v)


def usable_runs(s: Store) -> list[RunInfo]:
    """The store's complete runs; each run that cannot be used gets a warning with the reason."""
    runs = s.runs()
    for r in runs:
        if not r.ok:
            st.warning(f"Run **{plain(r.name)}** is skipped: {plain(r.problem)}")
    return [r for r in runs if r.ok]


def pick_run(need: tuple[str, ...] = ()) -> tuple[Store, RunInfo] | None:
    """Select a usable run (bound to ?run=); explains and returns None when there is none."""
    s = current_store()
    good = [r for r in usable_runs(s) if all(r.has(t) for t in need)]
    if not good:
        what = f" with {', '.join(need)}" if need else ""
        st.info(f"No complete run{what} in `{s.root}`. Build one with `clip-atlas demo --no-serve` "
                "or `clip-atlas compute` (then `textspan`, `label`, `metrics`).")
        return None
    names = [r.name for r in good]
    wanted = param("run", names[0])
    name = st.sidebar.selectbox("Run", names, index=names.index(wanted) if wanted in names else 0, key="run")
    set_params(run=name)
    return s, good[names.index(name)]


def start_page(title: str, need: tuple[str, ...] = ()) -> tuple[Store, RunInfo]:
    """The title and run picker every analysis page starts with; stops the page when no run fits."""
    st.title(title)
    picked = pick_run(need)
    if picked is None:
        st.stop()
    return picked


def pick_head(run: RunInfo, default_layer: int | None = None) -> tuple[int, int]:
    layers = run.manifest["head_layers"]
    layer = param("layer", default_layer if default_layer is not None else layers[-1], int)
    layer = layer if layer in layers else layers[-1]
    head = param("head", 0, int)
    head = head if 0 <= head < run.manifest["heads"] else 0
    c1, c2 = st.columns(2)
    layer = c1.selectbox("Layer", layers, index=layers.index(layer), key="layer")
    head = c2.selectbox("Head", list(range(run.manifest["heads"])), index=head, key="head")
    set_params(layer=layer, head=head)
    return layer, head


@dataclass
class PickedImage:
    image: Image.Image
    image_id: int | None       # set when it comes from the store's gallery
    caption: str


def pick_image(s: Store, run: RunInfo, key: str = "img") -> PickedImage | None:
    """An uploaded image, or one from the run's gallery (?image=ID)."""
    source = st.radio("Image", ["Gallery", "Upload"], horizontal=True, key=f"{key}_src",
                      index=1 if param("src") == "upload" else 0)
    if source == "Upload":
        set_params(src="upload", image=None)
        up = st.file_uploader("Upload an image", type=None, key=f"{key}_upload")
        if up is None:
            st.caption("PNG, JPEG, WebP, ... up to 20 MB.")
            return None
        with show_errors():
            return PickedImage(live.decode_upload(up.getvalue()), None, up.name)
        return None
    set_params(src=None)
    choice = gallery_grid(s, run, key)
    if choice is None:
        return None
    path = s.image_path(run, choice)
    info = s.image_info(run, [choice]).get(choice, ("?", None))
    with show_errors():
        return PickedImage(live.decode_upload(path.read_bytes()), choice, info[0] + (f"  ({info[1]})" if info[1] else ""))
    return None


GALLERY_PAGE = 12


def gallery_grid(s: Store, run: RunInfo, key: str) -> int | None:
    """A paged thumbnail grid of the run's images with a label filter and a path/label search; a click on an image's
    button picks it. The pick is kept in the URL (?image=ID); the first image is picked when there is none."""
    if s.image_count(run) == 0:
        st.info("This run has no images.")
        return None
    picked = param("image", None, int)
    if picked is not None and picked not in s.image_info(run, [picked]):
        picked = None
    with st.expander("Gallery: pick an image", expanded=picked is None):
        c1, c2, c3 = st.columns([2, 3, 1])
        labels = ["All labels"] + s.labels(run)
        wanted = param("glabel", "All labels")
        label = c1.selectbox("Label", labels, index=labels.index(wanted) if wanted in labels else 0, key=f"{key}_glabel")
        search = c2.text_input("Search path or label", value=param("gsearch", ""), key=f"{key}_gsearch")
        label = None if label == "All labels" else label
        total = s.gallery_count(run, label, search.strip() or None)
        pages = max(1, -(-total // GALLERY_PAGE))
        page = c3.number_input(f"Page (of {pages})", 1, pages, param_in("gpage", 1, 1, pages),
                               key=f"{key}_gpage")
        set_params(glabel=label, gsearch=search.strip() or None, gpage=page if page > 1 else None)
        rows = s.gallery(run, limit=GALLERY_PAGE, offset=(page - 1) * GALLERY_PAGE, label=label,
                         search=search.strip() or None)
        if not rows:
            st.caption("No image matches.")
        cols = st.columns(6)
        for n, (image_id, path, lab) in enumerate(rows):
            with cols[n % 6]:
                try:
                    show_image(Image.open(full_path(run, path)).convert("RGB"), px=96)
                except OSError:
                    st.caption(f"missing {path}")
                # the name as a caption (it wraps); a short button, so a narrow column never truncates it
                st.caption(plain(lab or Path(path).name, 60))
                if st.button("Picked" if image_id == picked else "Pick", key=f"{key}_pick_{image_id}", help=path,
                             type="primary" if image_id == picked else "secondary", width="stretch"):
                    picked = image_id
        st.caption(f"{total} images" + (f" with label {plain(label)}" if label else "") +
                   (f" matching “{search.strip()}”" if search.strip() else ""))
    if picked is None:
        first = s.gallery(run, limit=1)
        picked = first[0][0]
    set_params(image=picked)
    return picked


@contextlib.contextmanager
def show_errors():
    """Turn a user-facing error into a message on the page; the page keeps serving."""
    try:
        yield
    except AtlasError as e:
        st.error(plain(e, 300))
    except (OSError, ValueError) as e:
        st.error(f"Could not complete this: {type(e).__name__}: {str(e)[:200]}")


def enlarged(image: Image.Image, px: int = DISPLAY_PX) -> Image.Image:
    """Small images (the Shapes world is 64 px) enlarged to `px` on the long side without blurring."""
    if max(image.size) >= px:
        return image
    scale = px / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)


def show_image(image: Image.Image, caption: str | None = None, px: int = DISPLAY_PX) -> None:
    st.image(enlarged(image, px), caption=caption)


def image_grid(s: Store, run: RunInfo, hits: list[tuple], cols: int = 4, score_name: str = "dot product") -> None:
    """Top-k results, (image_id, score[, cosine]), as a grid of images; the readable score under each, the raw
    one on hover."""
    if not hits:
        st.info("No results.")
        return
    info = s.image_info(run, [h[0] for h in hits])
    columns = st.columns(cols)
    for n, hit in enumerate(hits):
        with columns[n % cols]:
            path, label = info.get(hit[0], ("?", None))
            shown, hover = score_caption(hit[1], hit[2] if len(hit) > 2 else None, score_name)
            try:
                show_image(Image.open(full_path(run, path)).convert("RGB"), px=160)
            except OSError:
                st.warning(f"missing file {path}")
            st.caption(shown + (f" · {label}" if label else ""), help=hover)


def pick_map_heads(run: RunInfo) -> list[tuple[int, int]] | None:
    """'All heads' (None) or one head of any layer, for live token maps (bound to ?heads=all|L5.H3; the older
    ?heads=5,3 still reads)."""
    n_layers, n_heads = run.manifest["layers"], run.manifest["heads"]
    raw = param("heads", "all")
    options = ["All heads"] + [head_name(l, h) for l in range(n_layers) for h in range(n_heads)]
    current = "All heads"
    if raw != "all":
        try:
            current = head_name(*parse_head(raw, n_layers, n_heads))
        except AtlasError:
            pass
    choice = st.selectbox("Heads", options, index=options.index(current), key="map_heads")
    if choice == "All heads":
        set_params(heads="all")
        return None
    set_params(heads=choice)
    return [parse_head(choice)]


DEFAULT_OPACITY = 0.55


def pick_opacity() -> float:
    """The heatmaps' opacity over the image (sidebar slider, bound to ?alpha=)."""
    wanted = param_in("alpha", DEFAULT_OPACITY, 0.0, 1.0, float)
    alpha = st.sidebar.slider("Heatmap opacity", 0.0, 1.0, wanted, 0.05, key="alpha")
    set_params(alpha=None if alpha == DEFAULT_OPACITY else alpha)
    return alpha


def live_map_controls(run: RunInfo) -> tuple[str, list[tuple[int, int]] | None, float]:
    """What the live segmentation pages share: the run's model spec, the heads to map, the opacity."""
    return run.manifest["model"], pick_map_heads(run), pick_opacity()


def show_scale(vmin: float, vmax: float) -> None:
    """The colour legend in data units."""
    st.image(colour_bar(vmin, vmax), width=DISPLAY_PX)
    st.caption(f"blue {vmin:+.4f} · white 0 · red {vmax:+.4f}" if vmin < 0 < vmax else f"{vmin:+.4f} … {vmax:+.4f}")


def show_heatmap(image: Image.Image, heat, vmin: float, vmax: float, caption: str,
                 alpha: float = DEFAULT_OPACITY) -> None:
    shown = overlay(image, heat, vmin, vmax, alpha)
    show_image(shown, caption)
    show_scale(vmin, vmax)
    download_png(shown, "heatmap", caption)


def download_png(image: Image.Image, what: str, name: str) -> None:
    """A download button for an image, as `name`.png."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    st.download_button(f"Download {what} (PNG)", buf.getvalue(), f"{slug(name)}.png", "image/png",
                       key=unique_key("dl_png", name), icon=":material/download:")


def show_which_heads(image: Image.Image, shares: list, alpha: float, name: str) -> None:
    """Small multiples of the first k head maps (maths.segment.HeadShare, ranked; k from a slider) on one shared
    scale, each captioned with its share of the total, and a CSV of every head's score and share."""

    top = max(1, len(shares))
    k = st.slider("Heads shown", 1, top, param_in("shown", min(8, top), 1, top), key="which_k")
    set_params(shown=k if k != min(8, top) else None)
    shown = shares[:k]
    if not shown:
        return
    own = st.toggle("Each map on its own scale", value=param("own", "0") == "1", key=unique_key("own", name),
                    help="Off: one colour scale for every map, so their strengths compare. On: each map's own "
                         "range, so weak heads' patterns show; the caption gives it.")
    set_params(own="1" if own else None)
    ranges = [symmetric_range(h.heat) for h in shown] if own else [symmetric_range(*[h.heat for h in shown])] * len(shown)
    tiles = [enlarged(overlay(image, h.heat, lo, hi, alpha), 128) for h, (lo, hi) in zip(shown, ranges)]
    captions = [f"{head_name(h.layer, h.head)} · {h.share:+.1%}" + (f" · ±{hi:.3g}" if own else "")
                for h, (_, hi) in zip(shown, ranges)]
    for start in range(0, len(tiles), MAPS_PER_ROW):        # full rows of four: 8 maps are 4 + 4, never 7 + 1
        cols = st.columns(MAPS_PER_ROW)
        for col, tile, cap in zip(cols, tiles[start:start + MAPS_PER_ROW], captions[start:start + MAPS_PER_ROW]):
            col.image(tile, caption=cap, width=128)
    if not own:
        show_scale(*ranges[0])
    download_png(contact_sheet(tiles, captions, MAPS_PER_ROW), "these maps", name)
    download_csv(pd.DataFrame([(h.layer, h.head, h.score, h.share) for h in shares],
                              columns=["layer", "head", "score", "share"]), name)


def contact_sheet(tiles: list[Image.Image], captions: list[str], per_row: int = 6) -> Image.Image:
    """Tiles in rows with their captions underneath: small multiples as one PNG."""
    w = max(t.width for t in tiles)
    h = max(t.height for t in tiles) + 18
    rows = -(-len(tiles) // per_row)
    sheet = Image.new("RGB", (w * min(per_row, len(tiles)), h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (tile, cap) in enumerate(zip(tiles, captions)):
        x, y = (n % per_row) * w, (n // per_row) * h
        sheet.paste(tile, (x, y))
        draw.text((x + 2, y + tile.height + 3), cap.replace("·", "|").replace("±", "+-"), fill="black")
    return sheet
