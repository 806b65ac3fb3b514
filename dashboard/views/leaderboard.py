"""Runs in the store and their metrics side by side."""
import pandas as pd
import streamlit as st

from compute.jobs.metrics import METRIC_INFO, metric_label
from compute.store.query import manifest_summary
from dashboard import charts
from dashboard.common import current_store, download_csv, show_errors

st.title("Leaderboard")
s = current_store()
with show_errors():
    runs = s.runs()
    if not runs:
        st.info(f"No runs in `{s.root}` yet. `clip-atlas demo --no-serve` builds the Shapes store.")
        st.stop()
    st.subheader("Runs")
    st.dataframe(pd.DataFrame([manifest_summary(r) for r in runs]), hide_index=True, width="stretch")
    board = s.leaderboard()
    if not board:
        st.info("No run has metrics yet: `clip-atlas metrics RUN`.")
        st.stop()
    st.subheader("Metrics")
    df = pd.DataFrame(board, columns=["run", "model", "metric", "value"]).pivot_table(
        index=["run", "model"], columns="metric", values="value").reset_index()
    # readable names, each metric's definition on hover; the table scrolls sideways when it is wider than the page
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        m: st.column_config.NumberColumn(metric_label(m), help=METRIC_INFO.get(m, ("", "", ""))[1] or None, format="%.3f")
        for m in df.columns if m not in ("run", "model")})
    download_csv(df, "leaderboard")
    st.caption("Hover a column for its definition; all of them are in docs/metrics.md.")
    ok = [r for r in runs if r.ok and r.has("metrics")]
    layer_rows = [(r.name, l, m, v) for r in ok for l, _, m, v in s.metrics(r, "layer") if m.startswith("ablation_cosine")]
    head_rows = [(r.name, l, h, v) for r in ok for l, h, m, v in s.metrics(r, "head") if m == "variance_explained"]
    prop_rows = [(r.name, hp.property) for r in ok for hp in s.properties(r)]
    c1, c2 = st.columns(2)
    if layer_rows:
        c1.altair_chart(charts.layer_effects(layer_rows, [r.name for r in ok]), width="stretch")
    if head_rows:
        c2.altair_chart(charts.variance_box(head_rows), width="stretch")
    if prop_rows:
        st.altair_chart(charts.property_counts(prop_rows), width="stretch")
