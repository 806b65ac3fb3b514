"""One head: its texts, property, top and bottom images, neighbours of an image, its heatmap, the neurons feeding it."""
import streamlit as st

from compute.headnames import head_name
from compute.render import symmetric_range
from dashboard import charts
from dashboard.common import (api_run, download_csv, param, pick_head, pick_image, pick_opacity, set_params,
                              show_errors, show_heatmap, show_hits, start_page, plain)

s, run = start_page("Head")
api = api_run(s, run)
with show_errors():
    layer, head = pick_head(run)
    view = api.head(layer, head)
    summary = {(l, h): (e, st_) for l, h, e, st_ in s.textspan_summary(run)}.get((layer, head))
    st.subheader(f"Layer {layer}, head {head}")
    m1, m2, m3 = st.columns(3)
    m1.metric("property", view.property or "none", f"confidence {view.confidence:.0%}" if view.confidence is not None
              else None, delta_color="off")
    m2.metric("variance its texts explain", f"{summary[0]:.0%}" if summary and summary[0] is not None else "n/a")
    m3.metric("stability", f"{summary[1]:.0%}" if summary and summary[1] is not None else "n/a",
              help="share of the top-5 texts that TextSpan on two disjoint halves of the images has in common")
    if view.texts.empty:
        st.info("This head has no TextSpan texts yet: `clip-atlas textspan RUN`.")
    else:
        st.altair_chart(charts.text_bars(list(view.texts.itertuples(index=False, name=None))), width="stretch")
        download_csv(view.texts, f"{head_name(layer, head)} texts")
        first = view.texts.text.iloc[0]
        a, b = st.columns(2)
        with a:
            st.markdown(f"**Furthest along “{plain(first)}”**")
            show_hits(s, run, view.top, score_name="projection on the direction", name=f"{head_name(layer, head)} top images")
        with b:
            st.markdown("**Furthest against it**")
            show_hits(s, run, view.bottom, score_name="projection on the direction",
                      name=f"{head_name(layer, head)} bottom images")
    st.divider()
    st.markdown("**An image through this head**")
    img = pick_image(s, run, key="himg")
    if img is not None:
        text = st.text_input("Heatmap text", value=param("htext", view.texts.text.iloc[0] if not view.texts.empty
                                                         else "a photo"), key="htext")
        set_params(htext=text or None)
        c1, c2 = st.columns([1, 2])
        with c1:
            heat = api.segment(img.image, text, heads=[(layer, head)])
            show_heatmap(img.image, heat, *symmetric_range(heat), f"“{text}” through {head_name(layer, head)}", pick_opacity())
        with c2:
            target = img.image_id if img.image_id is not None else img.image
            st.markdown("Its nearest stored images through this head")
            show_hits(s, run, api.neighbours(target, layer, head, k=8), name=f"{head_name(layer, head)} neighbours")
    if s.neuron_layers(run):
        feeding = s.neurons_through_head(run, layer, head, limit=6)
        st.subheader("Neurons whose second-order effect flows mainly through this head")
        if not feeding:
            st.caption("None of the analysed MLP neurons sends most of its effect through this head.")
        for r in feeding:
            st.page_link("views/neurons.py", icon=":material/neurology:",
                         label=f"L{r['layer']} neuron {r['neuron']} · {r['main_head_share']:.0%} via this head · "
                               + " · ".join(r["texts"][:3]),
                         query_params={"run": run.name, "nlayer": r["layer"], "neuron": r["neuron"]})
