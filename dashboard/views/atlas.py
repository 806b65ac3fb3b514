"""Every head: its property, its TextSpan texts, the images that express it most."""
import streamlit as st

from dashboard import charts
from dashboard.common import start_page, image_grid, pick_head, show_errors

s, run = start_page("Head atlas")
with show_errors():
    props = s.properties(run)
    truth = s.ground_truth(run)
    c1, c2 = st.columns(2)
    if props:
        c1.altair_chart(charts.property_grid(props), width="content")
    else:
        c1.info("No property labels yet: `clip-atlas textspan RUN` then `clip-atlas label RUN`.")
    if truth:
        c2.altair_chart(charts.specialisation_grid(truth), width="content")
    st.divider()
    layer, head = pick_head(run)
    label = {(l, h): (p, c) for l, h, p, c in props}.get((layer, head))
    if label:
        st.markdown(f"**Property:** {label[0]} · confidence {label[1]:.0%}")
    texts = s.head_texts(run, layer, head)
    if texts:
        st.altair_chart(charts.text_bars(texts), width="stretch")
        direction = s.head_direction(run, layer, head)
        st.subheader(f"Images that score highest on “{texts[0][1]}”")
        image_grid(s, run, s.head_top_k(run, layer, head, direction, k=8), score_name="projection on the direction")
    else:
        st.info("This head has no TextSpan texts yet.")
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
