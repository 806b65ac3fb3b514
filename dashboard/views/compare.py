"""Two or more runs side by side: metrics, property grids, heads per property, one property's heads and texts."""
import streamlit as st

from compute import api
from compute.headnames import head_name
from compute.jobs.metrics import metric_label
from dashboard import charts
from dashboard.common import current_store, param, set_params, show_errors, usable_runs, plain

st.title("Compare models")
s = current_store()
with show_errors():
    names = [r.name for r in usable_runs(s)]
    if len(names) < 2:
        st.info(f"Comparing needs two complete runs in `{s.root}`; this store has {len(names)}. "
                "`clip-atlas compute --model ... --out artifacts/RUN` adds one.")
        st.stop()
    wanted = list(dict.fromkeys(n for n in (param("runs", "") or "").split(",") if n in names)) or names[:2]
    chosen = st.multiselect("Runs", names, default=wanted, key="runs")
    set_params(runs=",".join(chosen) or None)
    if len(chosen) < 2:
        st.info("Pick at least two runs.")
        st.stop()
    cmp = api.compare(s, chosen)
    st.table(cmp.models[["run", "model", "family", "pool", "layers x heads", "parameters", "training", "images"]].set_index("run"))
    st.subheader("Metrics")
    if cmp.metrics.empty:
        st.info("None of these runs has metrics yet: `clip-atlas metrics RUN`.")
    else:
        table = cmp.metrics.pivot_table(index="metric", columns="run", values="value").reindex(columns=chosen)
        st.dataframe(table.rename(index=metric_label), width="stretch")
        st.download_button("Download metrics (CSV)", table.to_csv().encode(), "metrics.csv", "text/csv", key="dl_metrics")
        st.altair_chart(charts.metric_bars(cmp.metrics), width="stretch")
        st.caption("Each metric's definition is in docs/metrics.md (and on hover on the Leaderboard).")
    st.subheader("Head properties")
    if cmp.properties.empty:
        st.info("None of these runs has property labels yet: `clip-atlas textspan RUN`, then `clip-atlas label RUN`.")
        st.stop()
    cols = st.columns(len(chosen))
    for col, name in zip(cols, chosen):
        rows = cmp.properties[cmp.properties.run == name][["layer", "head", "property", "confidence"]]
        if rows.empty:
            col.info(f"{name}: no labels")
        else:
            col.altair_chart(charts.property_grid(list(rows.itertuples(index=False, name=None)), title=name),
                             width="content")
    counts = cmp.heads_per_property()
    st.subheader("Heads per property")
    st.dataframe(counts, width="stretch")
    props = [p for p in counts.index if p != "unlabelled"] or list(counts.index)
    prop = param("prop", props[0])
    prop = st.selectbox("Property", props, index=props.index(prop) if prop in props else 0, key="prop")
    set_params(prop=prop)
    heads = cmp.property_heads(prop)
    st.subheader(f"Heads labelled “{plain(prop)}” and their texts")
    cols = st.columns(len(chosen))
    for col, name in zip(cols, chosen):
        with col:
            st.markdown(f"**{plain(name)}**")
            mine = heads[heads.run == name]
            if mine.empty:
                st.caption("no head")
            for r in mine.itertuples():
                st.page_link("views/head.py", label=head_name(r.layer, r.head), icon=":material/center_focus_strong:",
                             query_params={"run": name, "layer": r.layer, "head": r.head})
                st.caption(" · ".join(r.texts[:5]) or "no texts")
    st.download_button("Download these heads (CSV)", heads.assign(texts=heads.texts.map(" | ".join)).to_csv(index=False)
                       .encode(), f"heads-{prop}.csv", "text/csv", key="dl_heads")
