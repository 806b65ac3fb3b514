"""Per-head nearest neighbours of an image."""
import streamlit as st

from dashboard import live
from dashboard.common import start_page, image_grid, pick_head, pick_image, show_errors, show_image

s, run = start_page("Image neighbours")
with show_errors():
    layer, head = pick_head(run)
    img = pick_image(s, run)
    if img is not None:
        show_image(img.image, img.caption)
        if img.image_id is not None:
            query = s.stored_head(run, img.image_id, layer, head)
        else:
            query = live.head_contributions(run.manifest["model"], img.image, (layer,))[0, head]
        st.subheader(f"Top 8 for layer {layer}, head {head}")
        image_grid(s, run, s.head_top_k(run, layer, head, query, k=8, exclude=img.image_id))
