"""Text A against text B on one image: the two difference maps on one shared scale, and the heads behind them."""
import streamlit as st

from compute.api import clean_text
from compute.maths.segment import contrastive, which_heads
from compute.render import symmetric_range
from dashboard import live
from dashboard.common import (live_map_controls, param, pick_image, set_params, show_errors, show_heatmap, show_image,
                              show_which_heads, start_page, plain)

s, run = start_page("Contrastive segmentation")
with show_errors():
    spec, heads, alpha = live_map_controls(run)
    c1, c2 = st.columns(2)
    text_a = c1.text_input("Text A", value=param("a", "a circle"), key="text_a")
    text_b = c2.text_input("Text B", value=param("b", "a square"), key="text_b")
    set_params(a=text_a or None, b=text_b or None)
    img = pick_image(s, run)
    if img is not None:
        text_a, text_b = clean_text(text_a), clean_text(text_b)
        maps = live.image_token_maps(spec, img.image)
        t_a, t_b = live.text_embedding(spec, text_a), live.text_embedding(spec, text_b)
        a_minus_b, b_minus_a = contrastive(maps, t_a, t_b, heads)
        vmin, vmax = symmetric_range(a_minus_b, b_minus_a)
        cols = st.columns(3)
        with cols[0]:
            show_image(img.image, img.caption)
        with cols[1]:
            show_heatmap(img.image, a_minus_b, vmin, vmax, f"“{text_a}” − “{text_b}”", alpha)
        with cols[2]:
            show_heatmap(img.image, b_minus_a, vmin, vmax, f"“{text_b}” − “{text_a}”", alpha)
        st.subheader(f"Which head sees “{plain(text_a)}” rather than “{plain(text_b)}”")
        show_which_heads(img.image, which_heads(maps, t_a - t_b), alpha, f"head shares for {text_a} vs {text_b}")
