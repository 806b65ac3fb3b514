"""Property-based nearest neighbours: images whose property heads say the same about them."""
import numpy as np
import streamlit as st

from dashboard import live
from dashboard.common import start_page, image_grid, param, pick_image, set_params, show_errors, show_image

s, run = start_page("Property search", need=("properties",))
with show_errors():
    names = s.property_names(run)
    if not names:
        st.info("No property vectors in this run: `clip-atlas label RUN`.")
        st.stop()
    wanted = param("property", names[0])
    prop = st.sidebar.selectbox("Property", names, index=names.index(wanted) if wanted in names else 0, key="property")
    k = st.sidebar.slider("Results", 1, 16, param("k", 4, int), key="k")
    set_params(property=prop, k=k)
    heads = s.heads_with_property(run, prop)
    st.caption(f"{len(heads)} heads carry **{prop}**: " + ", ".join(f"L{l}H{h}" for l, h in heads))
    img = pick_image(s, run)
    if img is not None:
        show_image(img.image, img.caption)
        if img.image_id is not None:
            query = s.stored_property_vector(run, img.image_id, prop)
        else:
            layers = tuple(sorted({l for l, _ in heads}))
            contrib = live.head_contributions(run.manifest["model"], img.image, layers)
            query = np.mean([contrib[layers.index(l), h] for l, h in heads], axis=0)
        st.subheader(f"Nearest by {prop}")
        image_grid(s, run, s.property_top_k(run, prop, query, k=k, exclude=img.image_id))
