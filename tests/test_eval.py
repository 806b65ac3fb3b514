"""The papers' experiments as commands: `eval segmentation` and `eval ablation`, on Shapes folders."""
from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from compute.cli import main
from compute.csvfiles import read_csv_rows
from compute.errors import AtlasError
from compute.eval.ablation import ablated_scores, head_scores, read_grouped_set, run_ablation, run_means
from compute.eval.segmentation import METHODS, evaluate_segmentation, pair_examples
from compute.headnames import parse_heads
from compute.images import read_labels
from compute.models import load_model
from compute.texts import fill_template

MODEL = "clip-atlas-shapes:random"


@pytest.fixture(scope="module")
def loaded():
    return load_model(MODEL)


def test_generate_writes_masks_as_pngs(shapes_dir):
    masks = np.load(shapes_dir / "masks.npy")
    for i in (0, 7, 47):
        png = np.asarray(Image.open(shapes_dir / "masks" / f"{i:06d}.png"))
        assert np.array_equal(png, masks[i])
    assert len(list((shapes_dir / "masks").glob("*.png"))) == len(masks)


def test_eval_segmentation_command(shapes_dir, tmp_path, capsys):
    out = tmp_path / "seg.csv"
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
               "--masks", str(shapes_dir / "masks"), "--labels", str(shapes_dir / "labels.csv"),
               "--limit", "12", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert int(r["images"]) == 12
        for k in ("pixel_accuracy", "miou", "map"):
            assert 0.0 <= float(r[k]) <= 1.0
    assert "decomposition" in capsys.readouterr().out


def test_generate_writes_object_phrases(shapes_dir):
    """objects.csv names every object of a scene as the training captions do, and nothing of the background."""
    scenes = pq.read_table(shapes_dir / "scenes.parquet").to_pylist()
    texts = read_labels(shapes_dir / "objects.csv")
    for sc in scenes[:12]:
        objs = [f"{sc[f'obj{i}_size']} {sc[f'obj{i}_color']} {sc[f'obj{i}_pattern']} {sc[f'obj{i}_shape']} "
                f"in the {sc[f'obj{i}_position']}" for i in range(1, sc["n_objects"] + 1)]
        assert texts[sc["path"]] == " and a ".join(objs)
        assert sc["background"] not in texts[sc["path"]]


def test_shapes_decomposition_beats_attention_and_rollout(tmp_path):
    """The issue's target, with the trained Shapes CLIP, on scenes no setting was chosen on.

    Fixed before seed 207 was first run: 500 one-object scenes, texts from objects.csv, every other setting the
    CLI's default; the decomposition's mIoU and mAP must both be above raw attention's and rollout's. The text
    (the object as the captions name it) was chosen on seed 301 and validated once on seed 303 (docs/reproduce.md)."""
    from compute.shapes.dataset import generate
    from compute.shapes.world import WorldSpec
    data = generate(500, seed=207, out=tmp_path / "seg", spec=WorldSpec(two_object_prob=0.0), progress=False)
    pairing = pair_examples(data / "images", data / "masks", data / "objects.csv")
    rows, _ = evaluate_segmentation(load_model("shapes"), pairing, ("decomposition", "attention", "rollout"),
                                    progress=False)
    got = {r["method"]: r for r in rows}
    for metric in ("miou", "map"):
        for other in ("attention", "rollout"):
            assert got["decomposition"][metric] > got[other][metric], (metric, other, rows)


def test_per_image_figures_add_up_to_the_table(shapes_dir, tmp_path):
    """--per-image: a row per image and method whose APs average to the table's mAP."""
    out, per = tmp_path / "seg.csv", tmp_path / "per.parquet"
    assert main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
                 "--masks", str(shapes_dir / "masks"), "--labels", str(shapes_dir / "objects.csv"),
                 "--methods", "decomposition,rollout", "--limit", "10", "--out", str(out),
                 "--per-image", str(per)]) == 0
    table = {r["method"]: r for r in csv.DictReader(open(out))}
    rows = pq.read_table(per).to_pandas()
    assert len(rows) == 20 and set(rows["method"]) == {"decomposition", "rollout"}
    texts = read_labels(shapes_dir / "objects.csv")
    assert all(texts[f"images/{p.rsplit('/', 1)[1]}"] == t for p, t in zip(rows["path"], rows["text"]))
    for m, g in rows.groupby("method"):
        assert g["ap"].mean() == pytest.approx(float(table[m]["map"]))
        assert g["ap_paper"].mean() == pytest.approx(float(table[m]["map_paper"]))
        assert ((g["iou_foreground"] >= 0) & (g["iou_foreground"] <= 1)).all()
    assert main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
                 "--masks", str(shapes_dir / "masks"), "--out", str(out), "--per-image", "x.txt"]) == 2


def test_eval_segmentation_counts_missing_and_bad_masks(shapes_dir, tmp_path, loaded):
    masks = tmp_path / "masks"
    shutil.copytree(shapes_dir / "masks", masks)
    (masks / "000001.png").unlink()
    (masks / "000002.png").write_bytes(b"not a png")
    Image.new("L", (10, 10)).save(masks / "000003.png")          # wrong size for its image
    pairing = pair_examples(shapes_dir / "images", masks, shapes_dir / "labels.csv", limit=8)
    assert pairing.skipped == {"no mask": 1}
    rows, skipped = evaluate_segmentation(loaded, pairing, ("decomposition", "rollout"), progress=False)
    assert skipped == {"no mask": 1, "bad mask": 2}
    assert [r["images"] for r in rows] == [6, 6]


def test_eval_segmentation_refuses_clearly(shapes_dir, tmp_path, capsys):
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
               "--masks", str(tmp_path), "--labels", str(shapes_dir / "labels.csv"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no image under") and "48 no mask" in err and err.count("\n") == 1
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
               "--masks", str(shapes_dir / "masks"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "pass --labels" in capsys.readouterr().err
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
               "--masks", str(shapes_dir / "masks"), "--methods", "decomposition,lrp", "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and "unknown method 'lrp'" in capsys.readouterr().err


def test_counts_and_templates_are_checked_before_any_work(shapes_dir, tmp_path, capsys):
    base = ["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
            "--masks", str(shapes_dir / "masks"), "--labels", str(shapes_dir / "labels.csv"), "--out", str(tmp_path / "x.csv")]
    for extra, message in ((["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
                           (["--limit", "-2"], "argument --limit: must be at least 1, got -2"),
                           (["--limit", "ten"], "argument --limit: 'ten' is not a whole number")):
        rc = main(base + extra)
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error: clip-atlas eval segmentation: ") and message in err
        assert err.count("\n") == 1
    for template in ("{} {}", "a {name}", "a {0}", "a {!r}", "a {", "a photo"):
        rc = main(base + ["--template", template])
        assert rc == 2 and "needs a {} where the label goes" in capsys.readouterr().err
    assert fill_template("{{{}}} shape", ["red"]) == ["{red} shape"]
    with pytest.raises(AtlasError, match="--limit must be at least 1"):
        pair_examples(shapes_dir / "images", shapes_dir / "masks", shapes_dir / "labels.csv", limit=0)
    assert not (tmp_path / "x.csv").exists()


def test_eval_segmentation_with_no_readable_image_writes_nothing(shapes_dir, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_text("not a png")
        shutil.copy(shapes_dir / "masks" / "000000.png", tmp_path / "masks" / name)
    (tmp_path / "labels.csv").write_text("path,label\nimages/a.png,red circle\nimages/b.png,red circle\n")
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(tmp_path / "images"), "--masks",
               str(tmp_path / "masks"), "--labels", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "x.csv")])
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1] == "error: no image could be scored: 2 bad image"
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------- ablation

@pytest.fixture(scope="module")
def grouped(shapes_dir, tmp_path_factory):
    """The Shapes folder as a group-annotated set: class = first object's shape, group = shape x background."""
    d = tmp_path_factory.mktemp("grouped")
    scenes = pq.read_table(shapes_dir / "scenes.parquet").to_pylist()
    with open(d / "groups.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows((s["path"], s["obj1_shape"], f"{s['obj1_shape']} on {s['background']}") for s in scenes)
    with open(d / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "prompt"], *[[c, f"a {c}"] for c in ("circle", "square", "triangle", "cross")]])
    return read_grouped_set(shapes_dir, d / "groups.csv", d / "classes.csv")


def test_ablating_no_heads_equals_base(loaded, grouped):
    hs = head_scores(loaded, grouped, [4, 5], progress=False)
    assert np.array_equal(ablated_scores(hs, [], hs.heads.mean(0)), hs.base)


def test_ablated_scores_equal_a_direct_recomputation(loaded, grouped):
    """e - c_lh + mean(c_lh), recomputed D-wide from the decomposition, then dotted with the class prompts."""
    heads = [(4, 1), (5, 0), (5, 6)]
    hs = head_scores(loaded, grouped, [4, 5], progress=False)
    from compute.images import load_image
    pix = torch.stack([loaded.preprocess(load_image(p)) for p in grouped.paths])
    d = loaded.decomposer(head_layers=(4, 5))(pix)
    T = loaded.encode_texts(grouped.prompts).double()
    C = d.heads.double()                                             # [N, 2, H, D]
    e = d.embedding.double().clone()
    for layer, h in heads:
        li = [4, 5].index(layer)
        e = e - C[:, li, h] + C[:, li, h].mean(0)
    fast = ablated_scores(hs, heads, hs.heads.mean(0))
    assert np.allclose(fast, (e @ T.T).numpy(), atol=1e-6)
    assert not np.allclose(fast, hs.base, atol=1e-4)                 # the ablation changes something


def test_eval_ablation_command_writes_the_report(shapes_dir, grouped, tmp_path, capsys):
    out = tmp_path / "ablation.json"
    groups_csv = tmp_path / "g.csv"
    classes_csv = tmp_path / "c.csv"
    # the same set written where the CLI can read it
    with open(groups_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "group"])
        w.writerows((p.relative_to(shapes_dir).as_posix(), grouped.classes[y], grouped.group_names[g])
                    for p, y, g in zip(grouped.paths, grouped.labels, grouped.groups))
    with open(classes_csv, "w", newline="") as f:
        csv.writer(f).writerows([["label", "prompt"], *zip(grouped.classes, grouped.prompts)])
    rc = main(["eval", "ablation", "--model", MODEL, "--images", str(shapes_dir), "--groups", str(groups_csv),
               "--classes", str(classes_csv), "--ablate", "4.1,5.0,5.6", "--random", "3", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    names = [c["name"] for c in report["conditions"]]
    assert names == ["base", "random", "property"]
    by = {c["name"]: c for c in report["conditions"]}
    assert by["property"]["heads"] == [[4, 1], [5, 0], [5, 6]] and by["base"]["heads"] == []
    assert len(by["random"]["heads"]) == 3 and {lh[0] for lh in by["random"]["heads"]} <= {4, 5}
    assert by["random"]["worst_group"] == max(d["worst_group"] for d in report["random_draws"])
    for c in report["conditions"]:
        assert c["worst_group"] == min(c["groups"].values()) <= c["average"]
    assert "worst group" in capsys.readouterr().out


def test_run_means_are_the_stored_means(shapes_run, loaded, grouped):
    from compute.store.layout import RunStore
    from compute.store.readers import read_head
    run, _ = shapes_run
    T = loaded.encode_texts(grouped.prompts)
    means = run_means(run, [5], loaded.info.heads, T)
    _, c = read_head(RunStore(run), 5, 3)
    assert np.allclose(means[0, 3], c.astype(np.float64).mean(0) @ T.double().numpy().T, atol=1e-6)


def test_ablation_errors_are_one_line(shapes_run, loaded, grouped):
    run, _ = shapes_run
    with pytest.raises(AtlasError, match="LAYER.HEAD"):
        parse_heads("4-1", 6, 8)
    with pytest.raises(AtlasError, match="outside a model"):
        parse_heads("6.0", 6, 8)
    with pytest.raises(AtlasError, match="pass --run"):
        run_ablation(loaded, grouped, "background", None, progress=False)
    with pytest.raises(AtlasError, match="is labelled 'no-such-property'"):
        run_ablation(loaded, grouped, "no-such-property", str(run), progress=False)
    with pytest.raises(AtlasError, match="stores no heads of layer 0"):
        run_ablation(loaded, grouped, "0.1", str(run), mean_from="run", progress=False)


def test_eval_segmentation_with_predicted_classes(shapes_dir, tmp_path, loaded):
    """ImageNet-Segmentation has no labels: the text is the model's predicted class among a class list."""
    classes = tmp_path / "classes.csv"
    with open(classes, "w", newline="") as f:
        csv.writer(f).writerows([["label", "prompt"], ["red circle", "a red circle"], ["blue square", "a blue square"],
                                 ["green cross", "a green cross"]])
    pairing = pair_examples(shapes_dir / "images", shapes_dir / "masks", None, limit=6, need_labels=False)
    assert all(e.label is None for e in pairing.examples)
    rows, skipped = evaluate_segmentation(loaded, pairing, ("decomposition", "chefer"), classes=str(classes),
                                          progress=False)
    assert [r["images"] for r in rows] == [6, 6] and not skipped


def test_class_and_label_files_with_broken_rows_fail_in_one_line(shapes_dir, tmp_path, capsys):
    """A stray carriage return inside a row (a CSV cut and pasted from a CRLF file) splits it in two: the
    second half has no prompt. That is one line naming the file and line, not a traceback from the tokenizer."""
    broken = tmp_path / "classes.csv"
    broken.write_bytes(b"label,prompt\r\nred circle\r,a red circle\r\n")
    rc = main(["eval", "segmentation", "--model", MODEL, "--images", str(shapes_dir / "images"),
               "--masks", str(shapes_dir / "masks"), "--classes", str(broken), "--out", str(tmp_path / "x.csv")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: classes file {broken}, line 2: no value for prompt")
    for text, message in (("label\nred circle\n", "needs the columns label,prompt (its header has label)"),
                          ("", "needs the columns label,prompt (its header has nothing)"),
                          ("label,prompt\n", "has no rows")):
        broken.write_text(text)
        with pytest.raises(AtlasError, match=re.escape(message)):
            read_csv_rows(broken, ("label", "prompt"), "classes")
    # a spreadsheet's byte-order mark does not hide the first column; an empty labels file is an empty mapping
    broken.write_bytes("\ufefflabel,prompt\nred circle,a red circle\n".encode())
    assert read_csv_rows(broken, ("label", "prompt"), "classes") == [{"label": "red circle", "prompt": "a red circle"}]
    broken.write_text("")
    assert read_labels(broken) == {}


def test_shapes_spurious_experiment(tmp_path):
    """The committed spurious model, end to end at a small size on seed 211 (fine-tuning used 0, docs 1-3).
    Threshold fixed before this seed was first run: ablating the background heads lifts worst-group accuracy
    above the model as is (seeds 1-3 at full size: +10.0, +9.2, +10.4 points)."""
    from compute.shapes.spurious import format_table, run_spurious
    report = run_spurious(tmp_path / "exp", seed=211, n_store=600, n_test=240, random_k=2, progress=False)
    saved = json.loads((tmp_path / "exp" / "ablation.json").read_text())
    assert saved["conditions"] == report["conditions"]
    by = {c["name"]: c for c in report["conditions"]}
    assert list(by)[:3] == ["base", "random", "property"] and list(by)[-1] == "searched"
    labels = {(r["layer"], r["head"]): r["property"]
              for r in pq.read_table(tmp_path / "exp" / "run" / "properties.parquet").to_pylist()}
    assert by["property"]["heads"] and all(labels[tuple(lh)] == "background" for lh in by["property"]["heads"])
    assert set(by["base"]["groups"]) == {"circle on grass", "circle on water", "square on grass", "square on water"}
    assert by["property"]["worst_group"] > by["base"]["worst_group"]
    assert "| property |" in format_table(report)
