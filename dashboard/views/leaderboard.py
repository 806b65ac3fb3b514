"""Runs in the store and their metrics side by side: the team's comparison page."""
import pandas as pd
import streamlit as st

from compute.jobs.metrics import METRIC_INFO, METRIC_VALIDATION, metric_help, metric_label
from compute.store.query import manifest_summary
from dashboard import charts
from dashboard.common import current_store, download_csv, param, set_params, show_errors

RUN_COLUMNS = ["run", "model", "family", "pool", "layers x heads", "parameters", "training"]

st.title("Leaderboard")
s = current_store()
with show_errors():
    runs = s.runs()
    if not runs:
        st.info(f"No runs in `{s.root}` yet. `clip-atlas demo --no-serve` builds the Shapes store.")
        st.stop()
    summaries = pd.DataFrame([manifest_summary(r) for r in runs])
    board = s.leaderboard()
    if not board:
        st.subheader("Runs")
        st.dataframe(summaries, hide_index=True, width="stretch")
        st.info("No run has metrics yet: `clip-atlas metrics RUN`.")
        st.stop()
    wide = pd.DataFrame(board, columns=["run", "model", "metric", "value"]).pivot_table(
        index="run", columns="metric", values="value").reset_index()
    metrics = [m for m in wide.columns if m != "run"]
    shown = [m for m in METRIC_INFO if m in metrics] + [m for m in metrics if m not in METRIC_INFO]
    default = "association" if "association" in shown else shown[0]
    wanted = param("rank", default)
    by = st.selectbox("Rank by", shown, index=shown.index(wanted) if wanted in shown else shown.index(default),
                      format_func=metric_label)
    set_params(rank=by)
    lower = METRIC_INFO.get(by, ("", "", ""))[2] == "lower"
    df = summaries[RUN_COLUMNS].merge(wide, on="run", how="inner").sort_values(by, ascending=lower, na_position="last", kind="stable")
    df.insert(0, "rank", range(1, len(df) + 1))
    # the ranked metric beside the run, then what the run is, then the other metrics: wider than the page, the
    # table scrolls sideways with rank and run pinned, so no row loses its name
    df = df[["rank", "run", by] + RUN_COLUMNS[1:] + [m for m in shown if m != by]]
    st.subheader("Metrics")
    st.dataframe(df, hide_index=True, width="stretch", column_config={
        "rank": st.column_config.NumberColumn("rank", pinned=True, width="small"),
        "run": st.column_config.TextColumn("run", pinned=True),
        "parameters": st.column_config.NumberColumn("parameters (vision)", format="compact"),
        **{m: st.column_config.NumberColumn(metric_label(m) + (" ✓" if METRIC_VALIDATION.get(m, ("",))[0] == "tracks" else ""),
                                            help=metric_help(m) or None, format="%.3f") for m in shown}})
    download_csv(df, "leaderboard")
    st.caption("Scroll the table sideways for every metric; click a column to sort; hover it for its definition and "
               "whether it was held against ground truth (✓: tracks it on the Shapes zoo). Definitions and the "
               "validation: docs/metrics.md.")
    sized = df.dropna(subset=["parameters", by])
    if len(sized):
        st.altair_chart(charts.metric_by_size(sized, by, metric_label(by)), width="stretch")
    if METRIC_VALIDATION:
        with st.expander("Which metrics track the truth (Shapes zoo, docs/metrics.md)"):
            st.dataframe(pd.DataFrame([(metric_label(m), v, rho, lo, hi) for m, (v, rho, lo, hi) in METRIC_VALIDATION.items()],
                                      columns=["metric", "verdict", "Spearman", "low", "high"]),
                         hide_index=True, width="stretch")
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
    with st.expander("Every run in the store"):
        st.dataframe(summaries, hide_index=True, width="stretch")
