"""`clip-atlas report RUN`: a run's summary as one self-contained HTML page (no scripts, no external files).

The page holds what a reader of a run asks first: the model and images, the model-level metrics, the
layers x heads grid of properties, each labelled head's TextSpan texts, the strongest MLP neurons when
`clip-atlas neurons` has run, and the Shapes ground truth when `clip-atlas shapes eval` has.
"""
from __future__ import annotations

import colorsys
import html
import time
from pathlib import Path

from compute.errors import AtlasError
from compute.headnames import head_name
from compute.store.query import Store, manifest_summary


def _colour(name: str, names: list[str]) -> str:
    if name == "unlabelled":
        return "#e5e5e5"
    hue = (names.index(name) * 0.61803) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.72, 0.55)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))


def build_report(run: str | Path) -> str:
    """The HTML text of a run's report."""
    path = Path(run).resolve()
    if not (path / "manifest.json").is_file():
        raise AtlasError(f"no run at {path} (no manifest.json); compute one with `clip-atlas compute`")
    s = Store(path.parent)
    info = s.run(path.name)
    if not info.ok:
        raise AtlasError(f"run {info.name} cannot be reported: {info.problem}")
    m = info.manifest
    parts = [f"<h1>clip-atlas report: {html.escape(info.name)}</h1>",
             f"<p class=muted>written {time.strftime('%Y-%m-%d %H:%M')} by <code>clip-atlas report</code></p>",
             "<h2>Run</h2>", _table(["field", "value"], [[html.escape(k), _fmt(v)] for k, v in manifest_summary(info).items()])]
    metrics = s.metrics(info, "model")
    parts.append("<h2>Metrics</h2>")
    parts.append(_table(["metric", "value"], [[html.escape(r.metric), _fmt(r.value)] for r in metrics])
                 if metrics else "<p>No metrics yet: <code>clip-atlas metrics RUN</code>.</p>")
    props = s.properties(info)
    parts.append("<h2>Head properties</h2>")
    if props:
        names = sorted({r.property for r in props})
        by = {(r.layer, r.head): (r.property, r.confidence) for r in props}
        layers = sorted({r.layer for r in props}, reverse=True)
        grid = [[f"<b>L{l}</b>"] + [
            (f'<span class=cell style="background:{_colour(by[(l, h)][0], names)}" title="{head_name(l, h)}: '
             f'{html.escape(by[(l, h)][0])} ({by[(l, h)][1]:.0%})">{html.escape(by[(l, h)][0][:4])}</span>')
            if (l, h) in by else "" for h in range(m["heads"])] for l in layers]
        parts.append(_table(["layer"] + [f"H{h}" for h in range(m["heads"])], grid, "grid"))
        legend = " ".join(f'<span class=cell style="background:{_colour(n, names)}">{html.escape(n)}</span>' for n in names)
        parts.append(f"<p>{legend}</p>")
        texts: dict[tuple[int, int], list[str]] = {}
        for row in s.all_head_texts(info):
            texts.setdefault((row.layer, row.head), []).append(row.text)
        rows = [[head_name(r.layer, r.head), html.escape(r.property), f"{r.confidence:.0%}",
                 html.escape(" · ".join(texts.get((r.layer, r.head), [])[:5]))]
                for r in props if r.property != "unlabelled"]
        parts += ["<h2>Labelled heads and their TextSpan texts</h2>",
                  _table(["head", "property", "confidence", "first texts"], rows)]
    else:
        parts.append("<p>No labels yet: <code>clip-atlas textspan RUN</code>, then <code>clip-atlas label RUN</code>.</p>")
    for layer in s.neuron_layers(info):
        top = s.neurons(info, layer, "mean_norm", limit=10)
        parts += [f"<h2>MLP layer {layer}: the neurons with the largest second-order effect</h2>",
                  _table(["neuron", "mean effect", "one direction", "main head", "texts"],
                         [[r["neuron"], f"{r['mean_norm']:.3g}", f"{r['direction_share']:.0%}",
                           head_name(r['main_head_layer'], r['main_head']), html.escape(" · ".join(r["texts"]))] for r in top])]
    if m.get("shapes_eval"):
        parts += ["<h2>Shapes ground truth</h2>",
                  _table(["figure", "value"], [[html.escape(k), _fmt(v)] for k, v in m["shapes_eval"].items()])]
    style = ("body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:3px 8px;"
             "text-align:left;vertical-align:top}th{background:#f4f4f4}.grid td{padding:1px}"
             ".cell{display:inline-block;min-width:2.6em;padding:2px 4px;border-radius:3px;font-size:11px}"
             ".muted{color:#777}code{background:#f4f4f4;padding:0 3px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>clip-atlas: {html.escape(info.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Writes RUN/report.html (or `out`)."""
    out = Path(out) if out else Path(run) / "report.html"
    text = build_report(run)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
