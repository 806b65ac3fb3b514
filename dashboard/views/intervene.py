"""Mean-ablate heads (or a property's heads) and see what changes: zero-shot accuracy, an image's class scores,
its segmentation."""
import streamlit as st

from compute.errors import AtlasError
from compute.headnames import head_name, parse_head
from compute.maths.segment import heatmap
from compute.render import symmetric_range
from compute.texts import zero_shot_template
from dashboard import charts, live
from dashboard.common import (api_run, download_csv, intervention, margin_gap, param, pick_image, pick_opacity, set_params,
                              show_errors, show_heatmap, show_image, start_page, plain)

MAX_LABELS = 16      # labels charted (the largest changes); the CSV has them all

s, run = start_page("Intervene")
api = api_run(s, run)
with show_errors():
    props = sorted({r.property for r in s.properties(run)} - {"unlabelled"})
    all_heads = [head_name(l, h) for l in run.manifest["head_layers"] for h in range(run.manifest["heads"])]
    wanted = param("ablate", props[0] if props else "")
    modes = (["A property's heads"] if props else []) + ["Chosen heads"]
    mode = st.radio("Ablate", modes, horizontal=True, key="imode",
                    index=0 if wanted in props or len(modes) == 1 else 1)
    if mode == "A property's heads":
        prop = st.selectbox("Property", props, index=props.index(wanted) if wanted in props else 0, key="iprop")
        heads = sorted(s.heads_with_property(run, prop))
        set_params(ablate=prop)
        st.caption(f"{len(heads)} heads labelled {plain(prop)}: " + ", ".join(head_name(l, h) for l, h in heads))
    else:
        default = []
        for x in wanted.split(","):        # older links spell heads 5.1: read them, show them as L5.H1
            try:
                name = head_name(*parse_head(x))
            except AtlasError:
                continue
            if name in all_heads and name not in default:
                default.append(name)
        chosen = st.multiselect("Heads (layer.head; the run's stored layers)", all_heads, default=default, key="iheads")
        heads = [parse_head(c) for c in chosen]
        set_params(ablate=",".join(chosen) or None)
    usual = zero_shot_template(api.model.info.architecture)
    template = st.text_input("Class prompt ({} is the label)", value=param("tpl", usual), key="itpl")
    set_params(tpl=template if template != usual else None)
    iv = intervention(str(s.root), run.name, run.manifest.get("finished_at", 0.0), tuple(heads), template)
    if not heads:
        st.info("Pick heads to mean-ablate: below is the model as it is.")
    overall = iv.accuracy.iloc[0]
    m1, m2, m3 = st.columns(3)
    m1.metric("zero-shot accuracy, as is", f"{overall['base']:.1%}", help=f"{overall['images']} labelled images, "
              f"{len(iv.classes)} classes")
    m2.metric(f"with {len(heads)} heads mean-ablated", f"{overall['ablated']:.1%}", f"{overall['change']:+.1%}")
    per_label = iv.accuracy.iloc[1:]
    moved = per_label[per_label["change"] != 0].sort_values("change", key=abs, ascending=False)
    if moved.empty:
        m3.metric("labels whose accuracy changes", "none")
    else:
        m3.metric("largest change", moved["label"].iloc[0], f"{moved['change'].iloc[0]:+.1%}")
    shown = (moved if len(moved) else per_label).head(MAX_LABELS)
    st.altair_chart(charts.paired_bars(shown, "label", "base", "ablated", "accuracy", ".0%",
                                       f"Accuracy per label: {len(shown)} of {len(per_label)}, largest change first"),
                    width="stretch")
    download_csv(iv.accuracy, "accuracy per label")

    st.divider()
    st.subheader("Where the gap between two labels lives")
    st.caption("The mean zero-shot margin (the true class's score minus the best other class's) of one label's images "
               "minus another's, split over every part of the decomposition. Heads and layers with a large share "
               "carry the gap; what the MLPs carry, no head ablation can remove.")
    per = iv.accuracy.iloc[1:].set_index("label")["base"]
    labels = list(per.index)
    if len(labels) > 1:
        g1, g2 = st.columns(2)
        wanted = param("gw", per.idxmin())
        worse = g1.selectbox("Images of", labels, index=labels.index(wanted) if wanted in labels else
                             labels.index(per.idxmin()), key="gworse")
        others = [c for c in labels if c != worse]
        wanted = param("gb", per.drop(worse).idxmax())
        better = g2.selectbox("against images of", others, index=others.index(wanted) if wanted in others else
                              others.index(per.drop(worse).idxmax()), key="gbetter")
        set_params(gw=worse, gb=better)
        gap = margin_gap(str(s.root), run.name, run.manifest.get("finished_at", 0.0), worse, better, template)
        k1, k2, k3, k4 = st.columns(4)
        k1.metric("margin gap", f"{gap.gap:+.4f}", help=f"accuracy {gap.worse_accuracy:.0%} against {gap.better_accuracy:.0%}")
        k2.metric("carried by heads", f"{gap.heads:.0%}")
        k3.metric("by MLPs", f"{gap.mlp:.0%}")
        k4.metric("by the rest", f"{gap.rest:.0%}", help="embedding, attention biases, norms' constants")
        c1, c2 = st.columns([3, 2])
        c1.altair_chart(charts.gap_by_layer(gap.layers, f"{worse[:40]} against {better[:40]}: per layer"),
                        width="stretch")
        top = gap.every_head.head(10)
        top = top.assign(name=[head_name(l, h) for l, h in zip(top["layer"], top["head"])])
        c2.dataframe(top[["name", "share"]].rename(columns={"name": "head"}), hide_index=True, width="stretch",
                     column_config={"share": st.column_config.NumberColumn("share of the gap", format="percent")})
        download_csv(gap.every_head, "gap share per head")

    st.divider()
    st.subheader("One image")
    img = pick_image(s, run, key="iimg")
    if img is not None:
        scores = api.class_scores(img.image_id if img.image_id is not None else img.image, iv)
        before, after = scores["class"][scores["base"].idxmax()], scores["class"][scores["ablated"].idxmax()]
        top = scores.assign(m=scores[["base", "ablated"]].max(axis=1)).nlargest(8, "m").drop(columns="m")
        c1, c2 = st.columns([1, 2])
        with c1:
            show_image(img.image, img.caption)
            st.markdown(f"Predicted **{plain(before)}** as is, **{plain(after)}** ablated.")
        with c2:
            st.altair_chart(charts.paired_bars(top, "class", "base", "ablated", "image · prompt",
                                               title="Its class scores (top 8)"), width="stretch")
        download_csv(scores, "class scores")
        classes = list(iv.classes)
        wanted_cls = param("cls", before)
        cls = st.selectbox("Segment for", classes, index=classes.index(wanted_cls if wanted_cls in classes else before),
                           key="icls")
        set_params(cls=cls if cls != before else None)
        maps = live.image_token_maps(run.manifest["model"], img.image)
        prompt = iv.prompts[classes.index(cls)]
        t = live.text_embedding(run.manifest["model"], prompt)
        whole, ablated = heatmap(maps, t), heatmap(maps, t, without=heads)
        vmin, vmax = symmetric_range(whole, ablated)
        alpha = pick_opacity()
        a, b = st.columns(2)
        with a:
            show_heatmap(img.image, whole, vmin, vmax, f"“{prompt}”, as is", alpha)
        with b:
            show_heatmap(img.image, ablated, vmin, vmax, f"“{prompt}”, heads ablated", alpha)
        st.caption("The ablated map leaves the heads' token maps out: a head's mean contribution belongs to no patch.")
