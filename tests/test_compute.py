"""`clip-atlas compute`: the store's invariants, bad input, resume after kill -9, and two ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from compute.cli import main
from compute.errors import AtlasError
from compute.jobs.compute import ComputeConfig, run_compute
from compute.store.layout import RunStore

MODEL = "clip-atlas-shapes:random"


def fetch(sql: str, params=()):
    return duckdb.connect().execute(sql, params).fetchall()


def image_rows(run: Path) -> dict[int, np.ndarray]:
    rows = fetch("SELECT image_id, embedding FROM read_parquet(?)", [str(run / "images" / "*.parquet")])
    return {i: np.asarray(e, np.float32) for i, e in rows}


def test_store_invariants_through_duckdb(shapes_dir, tmp_path):
    run = tmp_path / "run"
    m = run_compute(ComputeConfig(MODEL, str(shapes_dir), str(run), layers="last2", batch_size=16), progress=False)
    assert m["status"] == "complete" and m["image_count"] == 48 and m["head_layers"] == [4, 5]
    assert m["random_weights"] is True and m["patch_grid"] == [8, 8]
    emb = image_rows(run)
    assert len(emb) == 48
    # per image, the components sum to the embedding
    sums: dict[int, np.ndarray] = {}
    for image_id, c in fetch("SELECT image_id, contribution FROM read_parquet(?)", [str(run / "components" / "*.parquet")]):
        sums[image_id] = sums.get(image_id, 0) + np.asarray(c, np.float64)
    assert sums.keys() == emb.keys()
    for image_id, total in sums.items():
        assert np.abs(total - emb[image_id]).max() < 1e-4
    # per stored layer, the heads sum to the attn component
    heads = fetch("""
        SELECT image_id, layer, list(contribution ORDER BY head) FROM read_parquet(?, hive_partitioning = true)
        GROUP BY image_id, layer""", [str(run / "heads" / "*" / "*" / "*.parquet")])
    attn = {(i, l): np.asarray(c) for i, l, c in fetch(
        "SELECT image_id, layer, contribution FROM read_parquet(?) WHERE kind = 'attn'", [str(run / "components" / "*.parquet")])}
    assert len(heads) == 48 * 2
    for image_id, layer, per_head in heads:
        assert len(per_head) == 8
        assert np.abs(np.sum(np.asarray(per_head), 0) - attn[(image_id, layer)]).max() < 1e-4
    # labels come from labels.csv
    labels = fetch("SELECT DISTINCT label FROM read_parquet(?)", [str(run / "images" / "*.parquet")])
    assert all(len(l[0].split()) == 2 for l in labels)


def test_one_head_is_read_alone(shapes_dir, tmp_path):
    run = tmp_path / "run"
    run_compute(ComputeConfig(MODEL, str(shapes_dir), str(run), layers="last1", batch_size=48), progress=False)
    files = list(RunStore(run).head_dir(5, 3).glob("*.parquet"))
    assert files and all("layer=5/head=3" in str(f) for f in files)


def test_corrupt_files_are_skipped_and_listed(shapes_dir, tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(shapes_dir / "images", images / "cats")
    good = sorted((images / "cats").iterdir())[:5]
    for p in sorted((images / "cats").iterdir())[5:]:
        p.unlink()
    (images / "cats" / "text.jpg").write_text("not an image")
    (images / "cats" / "half.png").write_bytes(good[0].read_bytes()[:200])
    (images / "cats" / "empty.webp").write_bytes(b"")
    m = run_compute(ComputeConfig(MODEL, str(images), str(tmp_path / "run"), batch_size=4), progress=False)
    assert m["image_count"] == 5
    assert sorted(s["path"] for s in m["skipped"]) == ["cats/empty.webp", "cats/half.png", "cats/text.jpg"]
    assert fetch("SELECT DISTINCT label FROM read_parquet(?)", [str(tmp_path / "run" / "images" / "*.parquet")]) == [("cats",)]


def test_huge_image_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from compute.images import BadImage, load_image
    Image.new("RGB", (400, 300)).save(tmp_path / "big.png")
    with pytest.raises(BadImage, match="too large"):
        load_image(tmp_path / "big.png", max_pixels=100_000)


@pytest.mark.parametrize("args,message", [
    (["--model", MODEL, "--images", "{empty}"], "no images"),
    (["--model", "ViT-Nope-99", "--images", "{data}"], "unknown model"),
    (["--model", "RN50:random", "--images", "{data}"], "not supported"),
    (["--model", "ViT-B-32:not-a-tag", "--images", "{data}"], "unknown pretrained tag"),
    (["--model", "ViT-B-32:/no/such/file.pt", "--images", "{data}"], "checkpoint file not found"),
    (["--model", MODEL, "--images", "{data}", "--layers", "99"], "out of range"),
    (["--model", MODEL, "--images", "{data}", "--batch-size", "0"], "at least 1"),
    (["--model", "", "--images", "{data}"], "empty model name"),
])
def test_bad_input_is_one_line(shapes_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty", data=shapes_dir) for a in args]
    assert main(["compute", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.parametrize("argv,message", [
    (["compute", "--model", MODEL, "--images", "{data}", "--out", "{file}"], "is a file: give a folder path"),
    (["shapes", "generate", "--n", "3", "--out", "{file}/sub"], "is a file, not a folder"),
    (["shapes", "generate", "--n", "3", "--seed", "-1", "--out", "{tmp}/g"], "--seed: must be at least 0"),
    (["eval", "segmentation", "--model", MODEL, "--images", "{data}/images", "--masks", "{data}/masks",
      "--out", "{file}/seg.csv"], "is a file, not a folder"),
    (["eval", "segmentation", "--model", MODEL, "--images", "{data}/images", "--masks", "{data}/masks",
      "--out", "{tmp}", "--per-image", "{tmp}/p.csv"], "must end in .parquet or .csv"),
    (["eval", "segmentation", "--model", MODEL, "--images", "{data}/images", "--masks", "{data}/masks",
      "--out", "{tmp}/seg.csv", "--per-image", "{tmp}/folder.csv"], "is a folder: give a file path"),
    (["eval", "segmentation", "--model", MODEL, "--images", "{data}/images", "--masks", "{data}/masks",
      "--out", "{tmp}/seg.csv", "--per-image", "{tmp}/seg.csv"], "another file than --out"),
])
def test_outputs_that_cannot_be_written_are_refused_before_any_work(shapes_dir, tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "folder.csv").mkdir()
    argv = [a.format(data=shapes_dir, file=tmp_path / "file", tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert (tmp_path / "file").read_text() == "not a folder"


def test_file_system_refusals_are_one_line(monkeypatch, capsys):
    """Whatever the file system refuses mid-job (disk full, permissions) ends in one line, not a traceback."""
    import compute.jobs.report as report

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", "/data/run/report.html")
    monkeypatch.setattr(report, "write_report", full_disk)
    assert main(["report", "some-run"]) == 2
    assert capsys.readouterr().err.strip() == "error: No space left on device: /data/run/report.html"


def test_rerun_resumes_after_kill_9(shapes_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "compute.cli", "compute", "--model", MODEL, "--images", str(shapes_dir),
           "--out", str(run), "--batch-size", "2", "--chunk-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((run / "_chunks").glob("*.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list((run / "_chunks").glob("*.json")))
    assert 2 <= done_before < 12, "the run should have been killed part-way"
    assert json.loads((run / "manifest.json").read_text())["status"] == "partial"
    # an orphan part from an unfinished chunk must not survive the resume
    (run / "images" / "part-00000000deadbeef.parquet").write_bytes(b"junk")
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    ids = fetch("SELECT image_id FROM read_parquet(?)", [str(run / "images" / "*.parquet")])
    assert len(ids) == 48 and len(set(ids)) == 48
    assert json.loads((run / "manifest.json").read_text())["status"] == "complete"


def test_ctrl_c_keeps_every_decomposed_batch_and_the_rerun_finishes(shapes_dir, tmp_path, monkeypatch, capsys):
    """Chunks are written in the background: an interrupt must still leave every batch decomposed before it on
    disk (the chunk in flight and the partial one), each behind its marker, and a rerun does only the rest."""
    from compute.maths.decompose import Decomposer
    run, calls = tmp_path / "run", []
    decompose = Decomposer.__call__

    def interrupted_at_the_eighth_batch(self, images, *a, **k):
        calls.append(len(images))
        if len(calls) == 8:
            raise KeyboardInterrupt
        return decompose(self, images, *a, **k)

    monkeypatch.setattr(Decomposer, "__call__", interrupted_at_the_eighth_batch)
    argv = ["compute", "--model", MODEL, "--images", str(shapes_dir), "--out", str(run), "--batch-size", "4",
            "--chunk-size", "8"]
    assert main(argv) == 130
    assert "resumes" in capsys.readouterr().err
    stored = fetch("SELECT count(*), count(DISTINCT image_id) FROM read_parquet(?)", [str(run / "images" / "*.parquet")])
    assert stored == [(28, 28)]                        # seven batches of 4: three whole chunks and a partial one
    assert len(RunStore(run).markers()) == 4
    monkeypatch.setattr(Decomposer, "__call__", decompose)
    assert main(argv) == 0
    ids = [i for (i,) in fetch("SELECT image_id FROM read_parquet(?)", [str(run / "images" / "*.parquet")])]
    assert len(ids) == 48 and len(set(ids)) == 48
    heads = fetch("SELECT count(*) FROM read_parquet(?)", [str(run / "heads" / "layer=*" / "head=*" / "*.parquet")])
    assert heads[0][0] == 48 * len(RunStore(run).manifest()["head_layers"]) * RunStore(run).manifest()["heads"]


def test_a_failed_background_write_is_one_line_and_leaves_no_marker(shapes_dir, tmp_path, monkeypatch, capsys):
    from compute.store import layout
    written = layout.write_table_atomic

    def full_disk_on_the_second_chunk(table, path):
        if len(list((tmp_path / "run" / "_chunks").glob("*.json"))) >= 1:
            raise OSError(28, "No space left on device", str(path))
        written(table, path)

    monkeypatch.setattr(layout, "write_table_atomic", full_disk_on_the_second_chunk)
    argv = ["compute", "--model", MODEL, "--images", str(shapes_dir), "--out", str(tmp_path / "run"),
            "--batch-size", "8", "--chunk-size", "16", "--limit", "48"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].split("\r")[-1].startswith("error: No space left on device: ")
    assert len(RunStore(tmp_path / "run").markers()) == 1     # the failed chunk has no marker: a rerun redoes it
    monkeypatch.setattr(layout, "write_table_atomic", written)
    assert main(argv) == 0
    assert len(fetch("SELECT image_id FROM read_parquet(?)", [str(tmp_path / "run" / "images" / "*.parquet")])) == 48


def test_rerunning_a_complete_run_changes_nothing(shapes_dir, tmp_path):
    run = tmp_path / "run"
    cfg = ComputeConfig(MODEL, str(shapes_dir), str(run), limit=6)
    run_compute(cfg, progress=False)
    files = sorted(p.name for p in run.rglob("*.parquet"))
    m = run_compute(cfg, progress=False)
    assert m["status"] == "complete" and m["image_count"] == 6
    assert sorted(p.name for p in run.rglob("*.parquet")) == files


def test_other_settings_on_same_run_are_refused(shapes_dir, tmp_path, capsys):
    run = tmp_path / "run"
    run_compute(ComputeConfig(MODEL, str(shapes_dir), str(run), limit=4), progress=False)
    assert main(["compute", "--model", MODEL, "--images", str(shapes_dir), "--out", str(run), "--limit", "4", "--layers", "all"]) == 2
    assert "use another --out" in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_split_the_images(shapes_dir, tmp_path):
    run = tmp_path / "run"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", "29533", "-m", "compute.cli", "compute",
           "--model", MODEL, "--images", str(shapes_dir), "--out", str(run), "--batch-size", "8", "--chunk-size", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = {json.loads(p.read_text())["rank"] for p in (run / "_chunks").glob("*.json")}
    assert ranks == {0, 1}
    ids = fetch("SELECT image_id FROM read_parquet(?)", [str(run / "images" / "*.parquet")])
    assert len(ids) == 48 and len(set(ids)) == 48
    m = json.loads((run / "manifest.json").read_text())
    assert m["status"] == "complete" and m["image_count"] == 48


def test_each_rank_takes_its_own_gpu(monkeypatch):
    """Under torchrun every rank must use cuda:LOCAL_RANK (not all of them device 0) and make it current."""
    from compute import runtime as job
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(d))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    for rank in (0, 3, 7):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert job.pick_device("auto") == torch.device("cuda", rank)
        assert job.pick_device("cuda") == torch.device("cuda", rank)
    assert current[-1] == torch.device("cuda", 7)
    assert job.pick_device("cuda:2") == torch.device("cuda", 2)      # an explicit index is kept
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    with pytest.raises(AtlasError, match="16 processes on this node but 8 GPUs"):
        job.pick_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert job.pick_device("auto") == torch.device("cpu")


def test_workers_default_to_the_cores_of_this_rank(monkeypatch):
    from compute import runtime as job
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert job.default_workers() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert job.default_workers() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert job.default_workers() == 1


def test_float16_store_halves_disk_and_keeps_invariants_and_picks(tmp_path):
    """--store-dtype float16 on the trained Shapes model, 300 fresh scenes (seed 206). Fixed beforehand: the
    components sum to the embedding within 5e-4 (docs/store.md), and TextSpan's picks equal float32's."""
    from compute.jobs.textspan import run_textspan
    from compute.shapes.dataset import generate
    from compute.store.readers import read_components, read_images, vector_column
    data = generate(300, seed=206, out=tmp_path / "data", progress=False)
    sizes, picks = {}, {}
    for dt in ("float32", "float16"):
        run = tmp_path / dt
        run_compute(ComputeConfig("shapes", str(data), str(run), store_dtype=dt), progress=False)
        store = RunStore(run)
        assert store.manifest()["store_dtype"] == dt
        _, _, _, comps = read_components(store)
        emb = vector_column(read_images(store), "embedding")
        assert np.abs(comps.sum(1) - emb).max() <= (1e-5 if dt == "float32" else 5e-4)
        run_textspan(str(run), progress=False)
        picks[dt] = fetch("SELECT layer, head, rank, text_id FROM read_parquet(?) ORDER BY ALL", [str(run / "textspan.parquet")])
        sizes[dt] = sum(f.stat().st_size for d in ("heads", "components") for f in (run / d).rglob("*.parquet"))
    assert picks["float16"] == picks["float32"]
    assert sizes["float16"] < 0.6 * sizes["float32"]
    # a run is resumed only with the dtype it was started with
    assert main(["compute", "--model", "shapes", "--images", str(data), "--out", str(tmp_path / "float16"),
                 "--store-dtype", "float32"]) == 2


def test_fit_aspect_pads_extreme_images_only():
    from PIL import Image

    from compute.images import MAX_ASPECT, fit_aspect
    same = Image.new("RGB", (80, 10), (10, 20, 30))
    assert fit_aspect(same) is same
    out = fit_aspect(Image.new("RGB", (1, 5000), (200, 30, 30)))
    assert out.size == (625, 5000) and out.getpixel((312, 2500)) == (200, 30, 30)
    assert out.getpixel((0, 0)) == (200, 30, 30)          # padded with the mean colour
    assert max(fit_aspect(Image.new("RGB", (5000, 3))).size) / min(fit_aspect(Image.new("RGB", (5000, 3))).size) <= MAX_ASPECT


def test_commands_on_a_run_that_lacks_a_step_say_which(shapes_run, tmp_path, capsys):
    """Labelling before TextSpan, or indexing and TextSpan on layers the run did not store: one line, nothing written."""
    run, _ = shapes_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "texts.parquet").unlink()
    before = sorted(p.name for p in copy.iterdir())
    for args, message in ((["label", str(copy)], f"{copy} has no TextSpan texts yet: run `clip-atlas textspan {copy}` first"),
                          (["index", str(copy), "--layers", "0"], "layers 0 were not stored in"),
                          (["textspan", str(copy), "--layers", "0,1"], "layers 0, 1 were not stored in")):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert sorted(p.name for p in copy.iterdir()) == before


def test_a_folder_of_unreadable_images_is_an_error_not_an_empty_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"x{i}.png").write_text("not a png")
    assert main(["compute", "--model", MODEL, "--images", str(data), "--out", str(tmp_path / "run")]) == 2
    last = capsys.readouterr().err.splitlines()[-1]      # after the progress bar
    assert last.startswith("error: none of the 3 images could be used (the first, x0.png: not an image")
    assert RunStore(tmp_path / "run").manifest()["status"] == "partial"
