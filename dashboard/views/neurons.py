"""MLP neurons by their second-order effects: texts, top images, where in an image the effect comes from."""
import streamlit as st

from compute.headnames import head_name
from compute.render import symmetric_range
from dashboard import charts
from dashboard.common import (api_run, download_csv, param, pick_image, pick_opacity, set_params, show_errors,
                              show_heatmap, show_hits, show_image, start_page, plain, param_in, slug)

PAGE = 200
ORDERS = {"mean_norm": "mean effect", "max_norm": "largest effect", "direction_share": "one-direction share",
          "text_share": "described by its texts", "neuron": "neuron index"}

s, run = start_page("Neurons")
api = api_run(s, run)
layers = s.neuron_layers(run)
if not layers:
    st.info(f"**{plain(run.name)}** has no neuron tables yet: run `clip-atlas neurons {run.path}` (about a forward pass "
            "over the run's images).")
    st.stop()
with show_errors():
    c1, c2, c3 = st.columns([1, 2, 3])
    layer = param("nlayer", layers[0], int)
    layer = c1.selectbox("MLP layer", layers, index=layers.index(layer) if layer in layers else 0, key="nlayer")
    order = param("order", "mean_norm")
    order = c2.selectbox("Sort by", list(ORDERS), format_func=ORDERS.get,
                         index=list(ORDERS).index(order) if order in ORDERS else 0, key="norder")
    query = c3.text_input("Which neurons write …", value=param("q", ""), placeholder="e.g. water", key="nquery")
    set_params(nlayer=layer, order=order, q=query or None)
    total = api.neuron_count(layer)
    if query.strip():
        table = api.search_neurons(query, k=20, layer=layer)
        st.caption(f"Neurons of layer {layer} whose effect direction is closest to “{plain(query.strip())}” (cosine).")
        start = 0
    else:
        pages = list(range(0, total, PAGE)) or [0]
        start = param_in("nfrom", 0, 0, max(0, total - 1))
        start = st.selectbox(f"Rows ({total} neurons)", pages, index=pages.index(start - start % PAGE),
                             format_func=lambda a: f"{a + 1}-{min(a + PAGE, total)}", key="nfrom")
        set_params(nfrom=start or None)
        table = api.neurons(layer, order=order, limit=PAGE, offset=start)
    table = table.assign(texts=table["texts"].map(" · ".join),
                         head=[head_name(l, h) for l, h in zip(table["main_head_layer"], table["main_head"])])
    cols = ["neuron"] + (["score"] if "score" in table else []) + ["mean_norm", "max_norm", "direction_share",
                                                                   "texts", "head", "main_head_share"]
    # the table's key names what it shows, so a selection never outlives its rows: re-sorting or searching starts a
    # fresh table, and the neuron shown stays the one picked (held by its id in ?neuron=) until another is clicked
    picked = st.dataframe(table[cols], hide_index=True, on_select="rerun", selection_mode="single-row",
                          key=f"ntable_{layer}_{order}_{start}_{slug(query.strip())}",
                          column_config={
                              "mean_norm": st.column_config.NumberColumn("mean effect", format="%.2e",
                                                                         help="mean norm of the second-order effect"),
                              "max_norm": st.column_config.NumberColumn("max effect", format="%.2e"),
                              "direction_share": st.column_config.ProgressColumn(
                                  "one direction", help="share of the effects' energy along the principal direction",
                                  min_value=0.0, max_value=1.0, format="%.2f"),
                              "main_head_share": st.column_config.NumberColumn("via head", format="%.2f",
                                                                               help="share through the main head"),
                              "score": st.column_config.NumberColumn("cosine", format="%.3f")})
    download_csv(table[cols], f"neurons of layer {layer}")
    rows = picked.selection.rows if picked is not None else []
    ids = table["neuron"].tolist()
    neuron = ids[rows[0]] if rows else param_in("neuron", ids[0] if ids else 0, 0, max(0, total - 1))
    set_params(neuron=neuron)

    view = api.neuron(layer, neuron)
    info = view.info
    st.subheader(f"Neuron {neuron} of MLP layer {layer}")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("mean second-order effect", f"{info['mean_norm']:.2e}",
              help=f"direct (first-order) effect: {info['direct_mean_norm']:.2e}")
    m2.metric("along one direction", f"{info['direction_share']:.0%}")
    m3.metric("explained by its texts", f"{info['text_share']:.0%}")
    m4.metric("main head", head_name(info['main_head_layer'], info['main_head']), f"{info['main_head_share']:.0%} of it",
              delta_color="off")
    st.page_link("views/head.py", label=f"Open head {head_name(info['main_head_layer'], info['main_head'])}",
                 icon=":material/grid_view:",
                 query_params={"run": run.name, "layer": info["main_head_layer"], "head": info["main_head"]})
    left, right = st.columns(2)
    with left:
        st.altair_chart(charts.weight_bars(info["texts"], info["text_weights"], "Its description"), width="stretch")
        st.markdown("**Images where its effect is largest** (under each: the effect's norm)")
        show_hits(s, run, view.top, score_name="effect norm", name=f"neuron {layer}.{neuron} top images")
    with right:
        st.markdown("**Where in an image its effect comes from**")
        text = st.text_input("Project on a text instead of the neuron's direction", value=param("ntext", ""),
                             key="ntext")
        set_params(ntext=text or None)
        img = pick_image(s, run, key="nimg")
        if img is not None:
            heat = api.neuron_map(img.image, layer, neuron, text=text or None)
            show_image(img.image, img.caption)
            what = f"“{text.strip()}”" if text.strip() else "its principal direction"
            show_heatmap(img.image, heat, *symmetric_range(heat), f"neuron {neuron}, projected on {what}", pick_opacity())
