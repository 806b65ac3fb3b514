"""Where in the image does one head (or all) write the direction of a text, and which heads see it most?"""
import streamlit as st

from compute.api import clean_text
from compute.headnames import head_name
from compute.maths.segment import heatmap, which_heads
from compute.render import symmetric_range
from dashboard import live
from dashboard.common import (live_map_controls, param, pick_image, set_params, show_errors, show_heatmap, show_image,
                              show_which_heads, start_page, plain)

s, run = start_page("Topic segmentation")
with show_errors():
    spec, heads, alpha = live_map_controls(run)
    text = st.text_input("Text", value=param("text", "a red circle"), key="topic_text")
    set_params(text=text or None)
    img = pick_image(s, run)
    if img is not None:
        text = clean_text(text)
        maps = live.image_token_maps(spec, img.image)
        t = live.text_embedding(spec, text)
        heat = heatmap(maps, t, heads)
        c1, c2 = st.columns(2)
        with c1:
            show_image(img.image, img.caption)
        with c2:
            show_heatmap(img.image, heat, *symmetric_range(heat),
                         f"“{text}”, {'all heads' if heads is None else head_name(*heads[0])}", alpha)
        st.subheader("Which head sees it")
        st.caption(f"Every head's map for “{plain(text)}”, ranked by its share of the total: the head's sum over patches "
                   "divided by the sum of all heads' absolute sums.")
        show_which_heads(img.image, which_heads(maps, t), alpha, f"head shares for {text}")
