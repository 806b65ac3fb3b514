"""Per-head nearest neighbours of a text: which images does this head place closest to it?"""
import streamlit as st

from compute.api import clean_text
from dashboard.common import api_run, param, param_in, pick_head, set_params, show_errors, show_hits, start_page, plain

s, run = start_page("Text neighbours")
with show_errors():
    layer, head = pick_head(run)
    suggestions = s.head_texts(run, layer, head)
    if "query_text" not in st.session_state:
        st.session_state.query_text = param("text", suggestions[0].text if suggestions else "")
    if suggestions:
        st.caption("This head's TextSpan texts (click to use):")
        cols = st.columns(5)
        for i, (_, text, _, _) in enumerate(suggestions[:10]):
            if cols[i % 5].button(text, key=f"sugg{i}"):
                st.session_state.query_text = text
    text = st.text_input("Text", key="query_text")
    k = st.slider("Results", 1, 24, param_in("k", 8, 1, 24), key="k")
    set_params(text=text or None, k=k)
    text = clean_text(text)
    hits = api_run(s, run).text_neighbours(text, layer, head, k=k)
    st.subheader(f"Top {k} for “{plain(text)}” through layer {layer}, head {head}")
    show_hits(s, run, hits)
