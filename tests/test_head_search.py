"""The head search's stopping rules on a synthetic model with a known answer (no forward passes: HeadScores
built by hand).

Two classes, two groups per class: on-cue (the background agrees with the class) and off-cue. Head L0.H0 and
L0.H1 each add 0.8 to the class the background suggests; head L0.H2 adds a noisy 0.5 to the true class; three
more heads add small noise. Off-cue images are then misread. Ablating one cue head is not enough (0.9 against
1.2), both are (1.3 against 0.8): worst-group accuracy sits on a plateau after the first head, which is where the
first rule (stop when a step gains less than half a point) gives up, and where the nested rule, which judges
whole prefixes of the path on held-back images, does not.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from compute.eval.ablation import GroupedSet, HeadScores
from compute.eval.head_search import greedy, nested_length, run_search, split
from compute.headnames import head_name

GROUPS = ["0 on-cue", "0 off-cue", "1 on-cue", "1 off-cue"]


def synthetic(n: int = 800, seed: int = 0) -> tuple[HeadScores, GroupedSet]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    off = rng.random(n) < 0.3
    cue = np.where(off, 1 - y, y)
    heads = np.zeros((n, 1, 6, 2))
    heads[np.arange(n), 0, 0, cue] = 0.8
    heads[np.arange(n), 0, 1, cue] = 0.8
    heads[np.arange(n), 0, 2, y] = 0.5 + 0.05 * rng.standard_normal(n)
    heads[:, 0, 3:] = 0.02 * rng.standard_normal((n, 3, 2))
    hs = HeadScores(base=heads.sum((1, 2)), heads=heads, layers=[0], kept=np.arange(n), texts=None)
    data = GroupedSet(paths=[Path(f"{i}.png") for i in range(n)], labels=y, groups=2 * y + off, classes=["0", "1"],
                      prompts=["a 0", "a 1"], group_names=GROUPS)
    return hs, data


def test_the_nested_rule_finds_both_cue_heads_where_the_gain_rule_stalls():
    hs, data = synthetic()
    sel, _ = split(data.groups, 0)
    y, g = data.labels[sel], data.groups[sel]
    means = hs.heads[sel].mean(0)
    order = [(0, 0), (0, 1), (0, 3), (0, 4), (0, 5)]
    stalled, _ = greedy(hs, sel, y, g, GROUPS, means, order)
    assert stalled == []                                        # the first step gains nothing: the first rule stops
    path, steps = greedy(hs, sel, y, g, GROUPS, means, order, min_gain=None)
    assert path[:2] == [(0, 0), (0, 1)] and len(path) == 5 and len(steps) == 6
    rule = nested_length(hs, sel, y, g, GROUPS, means, seed=0)
    assert rule["length"] == 2 and set(rule["path"][:2]) == {head_name(0, 0), head_name(0, 1)}
    curve = {c["heads"]: c["worst_group"] for c in rule["curve"]}
    assert curve[0] < 0.05 and curve[1] < 0.05 and curve[2] > 0.95
    assert rule["inner_images"] + rule["stop_images"] == len(sel)


@pytest.mark.parametrize("stop, heads", [("nested", [[0, 0], [0, 1]]), ("gain", [])])
def test_the_report_says_which_rule_chose_the_heads(stop, heads):
    hs, data = synthetic()
    loaded = SimpleNamespace(info=SimpleNamespace(layers=1, heads=6, spec="synthetic"))
    report = run_search(loaded, data, hs=hs, seed=0, random_k=3, stop=stop, progress=False)
    by = {c["name"]: c for c in report["conditions"]}
    assert by["searched"]["heads"] == heads and report["search"]["stop"]["rule"] == stop
    if stop == "nested":                                        # held out: the repair holds on the test half
        assert by["searched"]["worst_group"] > 0.95 > by["random_searched"]["worst_group"]
    else:
        assert "no head narrowed" in by["searched"]["note"]
    with pytest.raises(ValueError, match="unknown stopping rule"):
        run_search(loaded, data, hs=hs, stop="patience", progress=False)


def test_the_search_runs_from_the_cli_on_a_labelled_folder(shapes_dir, tmp_path):
    """`eval ablation --search` on any folder with a path,label,group CSV: the report holds every condition, the
    rule that chose the heads, and the split of the gap over components, on disjoint halves of the images."""
    import csv
    import json

    import pyarrow.parquet as pq

    from compute.cli import main
    scenes = pq.read_table(shapes_dir / "scenes.parquet").to_pylist()
    groups, classes, out = tmp_path / "groups.csv", tmp_path / "classes.csv", tmp_path / "search.json"
    with open(groups, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group")] + [(s["path"], s["obj1_shape"],
                                                                 f"{s['obj1_shape']} on {s['background']}")
                                                                for s in scenes])
    with open(classes, "w", newline="") as f:
        csv.writer(f).writerows([("label", "prompt")] + [(c, f"a {c}") for c in ("circle", "square", "triangle",
                                                                                  "cross")])
    assert main(["eval", "ablation", "--model", "shapes", "--images", str(shapes_dir), "--groups", str(groups),
                 "--classes", str(classes), "--search", "--random", "2", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["conditions"]]
    assert names[0] == "base" and names[-1] == "searched"
    search = report["search"]
    assert search["stop"]["rule"] == "nested" and 0 <= search["stop"]["length"] <= search["max_heads"]
    assert search["selection_images"] + search["test_images"] == report["images"] == len(scenes)
    assert len(report["shares"]["every_head"]) == 6 * 8
