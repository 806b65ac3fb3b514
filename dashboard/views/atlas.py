"""Every head at a glance: the property grid (click a cell to open that head), ground truth on Shapes stores."""
import streamlit as st

from compute.headnames import head_name
from dashboard import charts
from dashboard.common import pick_head, show_errors, start_page, plain

s, run = start_page("Head atlas")
with show_errors():
    props = s.properties(run)
    truth = s.ground_truth(run)
    c1, c2 = st.columns(2)
    if props:
        event = c1.altair_chart(charts.property_grid(props, clickable=True), width="content", on_select="rerun",
                                key="grid")
        cell = (event.selection.get("cell") or [None])[0] if event is not None else None
        if cell:
            st.switch_page("views/head.py", query_params={"run": run.name, "layer": cell["layer"], "head": cell["head"]})
        c1.caption("Click a cell to open that head.")
    else:
        c1.info("No property labels yet: `clip-atlas textspan RUN` then `clip-atlas label RUN`.")
    if truth:
        c2.altair_chart(charts.specialisation_grid(truth), width="content")
    st.divider()
    layer, head = pick_head(run)
    label = {(r.layer, r.head): r for r in props}.get((layer, head))
    texts = s.head_texts(run, layer, head)
    st.markdown(f"**{head_name(layer, head)}** · " + (f"property: {plain(label.property)} ({label.confidence:.0%})" if label else "no property")
                + (f" · “{texts[0].text}”" if texts else ""))
    st.page_link("views/head.py", label=f"Open head {head_name(layer, head)}", icon=":material/open_in_new:",
                 query_params={"run": run.name, "layer": layer, "head": head})
