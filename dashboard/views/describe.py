"""One image in words: the texts its head contributions express most, and the heads behind each text."""
import streamlit as st

from compute.headnames import parse_head
from dashboard import charts
from dashboard.common import (api_run, download_csv, param_in, pick_image, set_params, show_errors, show_image,
                              start_page)

s, run = start_page("Describe an image", need=("textspan",))
api = api_run(s, run)
with show_errors():
    k = st.slider("Texts", 3, 30, param_in("k", 10, 3, 30), key="dk")
    set_params(k=k if k != 10 else None)
    img = pick_image(s, run, key="dimg")
    if img is not None:
        d = api.describe(img.image_id if img.image_id is not None else img.image, k=k)
        c1, c2 = st.columns([1, 2])
        with c1:
            show_image(img.image, img.caption)
        with c2:
            st.altair_chart(charts.text_scores(d.texts), width="stretch")
        st.caption("Each head's contribution, less its mean over the run's images, projected on the head's TextSpan "
                   "directions; a text's score adds its projections over the heads that picked it.")
        download_csv(d.texts.assign(heads=d.texts["heads"].map(" ".join),
                                    head_scores=d.texts["head_scores"].map(lambda x: " ".join(f"{v:.5f}" for v in x))),
                     "description")
        st.subheader("The heads behind the first texts")
        for row in d.texts.head(3).itertuples():
            cols = st.columns([2] + [1] * 4)
            cols[0].markdown(f"**{row.text}**  \n{row.score:+.4f}")
            for col, head, score in zip(cols[1:], row.heads, row.head_scores):
                layer, h = parse_head(head)
                col.page_link("views/head.py", label=f"{head} {score:+.4f}", icon=":material/center_focus_strong:",
                              query_params={"run": run.name, "layer": layer, "head": h})
        st.subheader("Per head: its texts along this image")
        best = d.pairs.drop_duplicates(["layer", "head"]).sort_values("score", ascending=False)
        st.dataframe(best, hide_index=True, column_config={
            "score": st.column_config.NumberColumn("projection", format="%.4f"),
            "share": st.column_config.ProgressColumn("share of the head's centred contribution", min_value=0.0,
                                                     max_value=1.0, format="%.2f"),
            "rank": st.column_config.NumberColumn("TextSpan rank")})
        download_csv(d.pairs, "every head and text")
