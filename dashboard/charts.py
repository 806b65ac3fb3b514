"""Altair charts used by the pages (presentation only)."""
from __future__ import annotations

import zlib

import altair as alt
import numpy as np
import pandas as pd
from PIL import Image

from compute.render import colormap


# One colour per property or attribute on every page (atlas, ground truth, compare, leaderboard): the Shapes
# attributes and the general pool's tags in a fixed order, a plural sharing its singular's colour ("colors" and
# "color"); names outside the list by a stable hash; heads without a label grey.
_PALETTE = ["#4e79a7", "#e15759", "#b07aa1", "#76b7b2", "#59a14f", "#f28e2b", "#edc948", "#ff9da7", "#9c755f",
            "#a0cbe8", "#ffbe7d", "#8cd17d", "#b6992d", "#f1ce63", "#499894", "#86bcb6", "#d37295", "#fabfd2",
            "#d4a6c8", "#79706e"]
_KNOWN = ["color", "shape", "pattern", "size", "position", "background", "location", "animal", "texture", "material",
          "object", "scene", "people", "food", "plant", "vehicle", "bird", "weather", "lighting", "letter"]
_NEUTRAL = {"unlabelled": "#bab0ac", "mixed": "#d7d7d7"}


def property_colour(name: str) -> str:
    if name in _NEUTRAL:
        return _NEUTRAL[name]
    key = name[:-1] if name.endswith("s") and name[:-1] in _KNOWN else name
    i = _KNOWN.index(key) if key in _KNOWN else zlib.crc32(key.encode()) % len(_PALETTE)
    return _PALETTE[i % len(_PALETTE)]


def property_scale(names) -> alt.Scale:
    """A colour scale whose colours do not depend on which names a chart happens to show."""
    domain = sorted(set(names), key=lambda n: (n in _NEUTRAL, n))
    return alt.Scale(domain=domain, range=[property_colour(n) for n in domain])


def property_grid(rows: list[tuple[int, int, str, float]], title: str = "Head properties",
                  clickable: bool = False) -> alt.Chart:
    """Layers x heads coloured by property; `clickable` adds a point selection named `cell` on (layer, head)."""
    df = pd.DataFrame(rows, columns=["layer", "head", "property", "confidence"])
    chart = alt.Chart(df, title=title)
    if clickable:
        chart = chart.add_params(alt.selection_point(name="cell", fields=["layer", "head"], on="click"))
    return chart.mark_rect(stroke="white", cursor="pointer" if clickable else "default").encode(
        x=alt.X("head:O", title="head"), y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("property:N", scale=property_scale(df["property"])),
        opacity=alt.Opacity("confidence:Q", scale=alt.Scale(domain=[0, 1], range=[0.35, 1]), legend=None),
        tooltip=["layer", "head", "property", alt.Tooltip("confidence:Q", format=".2f")],
    ).properties(height=alt.Step(28), width=alt.Step(28))


def specialisation_grid(rows: list[tuple[int, int, str, float, bool]]) -> alt.Chart:
    df = pd.DataFrame(rows, columns=["layer", "head", "attribute", "lift", "specialised"])
    best = df.sort_values("lift", ascending=False).groupby(["layer", "head"], as_index=False).first()
    best["label"] = np.where(best["specialised"], best["attribute"], "mixed")
    return alt.Chart(best, title="Ground truth: the attribute each head specialises in").mark_rect(stroke="white").encode(
        x="head:O", y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("label:N", scale=property_scale(best["label"]), title="attribute"),
        tooltip=["layer", "head", "attribute", alt.Tooltip("lift:Q", format=".2f"), "specialised"],
    ).properties(height=alt.Step(28), width=alt.Step(28))


def text_bars(rows: list[tuple[int, str, float, float]]) -> alt.Chart:
    df = pd.DataFrame(rows, columns=["rank", "text", "variance", "cumulative"])
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("variance:Q", title="share of the head's variance", axis=alt.Axis(format="%")),
        y=alt.Y("text:N", sort=alt.SortField("rank"), title=None, axis=alt.Axis(labelLimit=320)),
        tooltip=["rank", "text", alt.Tooltip("variance:Q", format=".1%"), alt.Tooltip("cumulative:Q", format=".1%")],
    )


def layer_effects(rows: list[tuple], run_names: list[str]) -> alt.Chart:
    """rows: (run, layer, metric, value) of ablation_cosine_* -> line chart of 1 - cosine per layer."""
    df = pd.DataFrame(rows, columns=["run", "layer", "metric", "value"])
    df["effect"] = 1 - df["value"]
    df["part"] = df["metric"].str.replace("ablation_cosine_", "", regex=False)
    # the dash pattern is named in the subtitle: a legend of line symbols for it does not render on a point-line mark
    title = alt.Title("Direct effect per layer (1 - cosine kept under mean-ablation)",
                      subtitle="attention: solid line · MLP: dashed line")
    return alt.Chart(df, title=title).mark_line(point=True).encode(
        x="layer:O", y=alt.Y("effect:Q", title="1 - cosine"), color="run:N",
        strokeDash=alt.StrokeDash("part:N", scale=alt.Scale(domain=["attn", "mlp"], range=[[1, 0], [6, 4]]), legend=None),
        tooltip=["run", "part", "layer", alt.Tooltip("effect:Q", format=".4f")])


def metric_by_size(df: pd.DataFrame, metric: str, title: str) -> alt.Chart:
    """One point per run: the metric against the vision tower's parameters (log scale), by family and pool."""
    data = df[["run", "model", "family", "pool", "layers x heads", "parameters", metric]].rename(columns={metric: "value"})
    return alt.Chart(data, title=f"{title} against model size").mark_point(size=90, filled=True).encode(
        x=alt.X("parameters:Q", scale=alt.Scale(type="log"), title="vision tower parameters (log scale)"),
        y=alt.Y("value:Q", title=title, scale=alt.Scale(zero=False)),
        color=alt.Color("family:N"), shape=alt.Shape("pool:N"),
        tooltip=["run", "model", "family", "pool", "layers x heads", alt.Tooltip("parameters:Q", format=",.0f"),
                 alt.Tooltip("value:Q", format=".3f", title=title)])


def variance_box(rows: list[tuple]) -> alt.Chart:
    df = pd.DataFrame(rows, columns=["run", "layer", "head", "value"])
    return alt.Chart(df, title="Variance explained by each head's TextSpan texts").mark_boxplot().encode(
        x="run:N", y=alt.Y("value:Q", title="share of variance", axis=alt.Axis(format="%")), color="run:N")


def property_counts(rows: list[tuple[str, str]]) -> alt.Chart:
    df = pd.DataFrame(rows, columns=["run", "property"])
    return alt.Chart(df, title="Heads per property").mark_bar().encode(
        x=alt.X("count():Q", title="heads"), y=alt.Y("run:N"), color=alt.Color("property:N", scale=property_scale(df["property"])),
        tooltip=["run", "property", "count()"])


def colour_bar(vmin: float, vmax: float, width: int = 256, height: int = 14) -> Image.Image:
    """The heatmap legend: the same ramp as the overlay, low values left."""
    ramp = colormap(np.linspace(0, 1, width))[None].repeat(height, 0)
    return Image.fromarray((ramp * 255).round().astype(np.uint8))


def weight_bars(texts: list[str], weights: list[float], title: str | None = None) -> alt.Chart:
    """A sparse text description: each text's non-negative weight, in the order it was picked."""
    df = pd.DataFrame({"text": texts, "weight": weights, "order": range(len(texts))})
    return alt.Chart(df, title=title or "").mark_bar().encode(
        x=alt.X("weight:Q", title="weight in the description"),
        y=alt.Y("text:N", sort=alt.SortField("order"), title=None, axis=alt.Axis(labelLimit=320)),
        tooltip=["text", alt.Tooltip("weight:Q", format=".3f")])


def metric_bars(rows: pd.DataFrame) -> alt.Chart:
    """metric, run, value -> one small bar chart per metric (each on its own scale), runs side by side."""
    return alt.Chart(rows).mark_bar().encode(
        x=alt.X("value:Q", title=None), y=alt.Y("run:N", title=None), color=alt.Color("run:N", legend=None),
        tooltip=["metric", "run", alt.Tooltip("value:Q", format=".4f")],
    ).properties(width=220, height=alt.Step(16)).facet(facet=alt.Facet("metric:N", title=None), columns=3
    ).resolve_scale(x="independent")


def paired_bars(df: pd.DataFrame, key: str, before: str, after: str, x_title: str, fmt: str = ".3f",
                title: str = "") -> alt.Chart:
    """One row per `key`, two bars each: the `before` and `after` columns (e.g. base and ablated), in row order."""
    long = df[[key, before, after]].reset_index(drop=True).reset_index(names="order").melt(["order", key], var_name="condition",
                                                                    value_name="value")
    return alt.Chart(long, title=title).mark_bar().encode(
        x=alt.X("value:Q", title=x_title, axis=alt.Axis(format=fmt)),
        y=alt.Y(f"{key}:N", sort=alt.SortField("order"), title=None, axis=alt.Axis(labelLimit=320)),
        yOffset=alt.YOffset("condition:N", sort=[before, after]),
        color=alt.Color("condition:N", sort=[before, after], scale=alt.Scale(range=["#9aa5b1", "#c0392b"]),
                        title=None, legend=alt.Legend(orient="top")),
        tooltip=[key, "condition", alt.Tooltip("value:Q", format=fmt)])


def gap_by_layer(layers: pd.DataFrame, title: str) -> alt.Chart:
    """Share of a margin gap per layer and part (attention heads, their bias, the MLP), as grouped bars."""
    parts = ["attn", "attn_bias", "mlp"]
    return alt.Chart(layers, title=title).mark_bar().encode(
        x=alt.X("layer:O"), xOffset=alt.XOffset("part:N", sort=parts),
        y=alt.Y("share:Q", title="share of the gap", axis=alt.Axis(format="%")),
        color=alt.Color("part:N", sort=parts, scale=alt.Scale(domain=parts, range=["#4e79a7", "#a0cbe8", "#f28e2b"]),
                        legend=alt.Legend(orient="top", title=None)),
        tooltip=["layer", "part", alt.Tooltip("share:Q", format=".1%")])


def text_scores(df: pd.DataFrame) -> alt.Chart:
    """An image's description: text, score, heads (a text per row, largest score first)."""
    df = df.assign(order=range(len(df)), behind=df["heads"].map(", ".join))
    return alt.Chart(df).mark_bar().encode(
        x=alt.X("score:Q", title="projection beyond the average image (embedding units)"),
        y=alt.Y("text:N", sort=alt.SortField("order"), title=None, axis=alt.Axis(labelLimit=320)),
        color=alt.condition("datum.score > 0", alt.value("#c0392b"), alt.value("#3b4cc0")),
        tooltip=["text", alt.Tooltip("score:Q", format=".4f"), alt.Tooltip("behind:N", title="heads")])
