"""Property-based nearest neighbours: images whose property heads say the same about them."""
import streamlit as st

from compute.headnames import head_name
from dashboard.common import (api_run, param, param_in, pick_image, set_params, show_errors, show_hits, show_image,
                              start_page, plain)

s, run = start_page("Property search", need=("properties",))
with show_errors():
    names = s.property_names(run)
    if not names:
        st.info("No property vectors in this run: `clip-atlas label RUN`.")
        st.stop()
    wanted = param("property", names[0])
    prop = st.sidebar.selectbox("Property", names, index=names.index(wanted) if wanted in names else 0, key="property")
    k = st.sidebar.slider("Results", 1, 16, param_in("k", 4, 1, 16), key="k")
    set_params(property=prop, k=k)
    heads = s.heads_with_property(run, prop)
    st.caption(f"{len(heads)} heads carry **{plain(prop)}**: " + ", ".join(head_name(l, h) for l, h in heads))
    img = pick_image(s, run)
    if img is not None:
        show_image(img.image, img.caption)
        hits = api_run(s, run).property_neighbours(img.image_id if img.image_id is not None else img.image, prop, k=k)
        st.subheader(f"Nearest by {plain(prop)}")
        show_hits(s, run, hits)
