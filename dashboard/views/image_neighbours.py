"""Per-head nearest neighbours of an image."""
import streamlit as st

from dashboard.common import api_run, pick_head, pick_image, show_errors, show_hits, show_image, start_page

s, run = start_page("Image neighbours")
with show_errors():
    layer, head = pick_head(run)
    img = pick_image(s, run)
    if img is not None:
        show_image(img.image, img.caption)
        hits = api_run(s, run).neighbours(img.image_id if img.image_id is not None else img.image, layer, head, k=8)
        st.subheader(f"Top 8 for layer {layer}, head {head}")
        show_hits(s, run, hits)
