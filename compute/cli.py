"""The `clip-atlas` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AtlasError

DEFAULT_STORE = "artifacts"


def _compute(a: argparse.Namespace) -> None:
    from .job import ComputeConfig, run_compute
    m = run_compute(ComputeConfig(model=a.model, images=a.images, out=a.out, layers=a.layers,
                                  batch_size=a.batch_size, device=a.device, limit=a.limit, labels=a.labels,
                                  chunk_size=a.chunk_size, precision=a.precision, workers=a.workers))
    if m["rank"] == 0:
        print(f"{m['status']}: {m['image_count']} images, {len(m['skipped'])} skipped -> {a.out}")


def _models(a: argparse.Namespace) -> None:
    from .models import REGISTRY
    for name, (arch, tag) in REGISTRY.items():
        print(f"{name:34s} {arch} {Path(tag).name if '/' in tag else tag}")
    print("also: any open_clip ViT as NAME:TAG, NAME:/path/to/weights, NAME:random, local-dir:/path")


def _shapes_generate(a: argparse.Namespace) -> None:
    from .shapes.dataset import generate
    out = generate(a.n, a.seed, a.out)
    print(f"wrote {a.n} scenes to {out}")


def _shapes_train(a: argparse.Namespace) -> None:
    from .models import SHAPES_WEIGHTS
    from .shapes.train import TrainConfig, train
    cfg = TrainConfig(steps=a.steps, seed=a.seed)
    train(cfg, Path(a.out) if a.out else SHAPES_WEIGHTS)


def _shapes_eval(a: argparse.Namespace) -> None:
    from .shapes.groundtruth import evaluate_run
    summary = evaluate_run(a.run, progress=True)
    print(json.dumps(summary, indent=2))


def _shapes_validate(a: argparse.Namespace) -> None:
    from .shapes.validate import format_report, validate
    report = validate(a.out, seeds=a.seeds, n=a.n, seed_base=a.seed_base)
    print(format_report(report))
    print(f"report: {Path(a.out) / 'report.json'}")


def _textspan(a: argparse.Namespace) -> None:
    from .jobs.textspan import run_textspan
    m = run_textspan(a.run, a.texts, m=a.m, rank=a.rank, layers=a.layers, device=a.device)
    ts = m["textspan"]
    print(f"textspan: {len(ts['layers'])} layers x {m['heads']} heads, up to {ts['m']} texts each -> {a.run}/textspan.parquet")
    print(f"stability (top-{ts['stability_k']} picks shared by two halves of the images): mean {ts['mean_stability']:.2f}, "
          f"{ts['unstable_heads']} heads flagged unstable")


def _label(a: argparse.Namespace) -> None:
    from .properties import run_label
    labels = run_label(a.run, a.method, a.reference)
    counts: dict[str, int] = {}
    for x in labels:
        counts[x.property] = counts.get(x.property, 0) + 1
    print("heads per property: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))


def _metrics(a: argparse.Namespace) -> None:
    from .metrics import run_metrics
    t = run_metrics(a.run)
    for r in t.to_pylist():
        if r["scope"] == "model":
            print(f"{r['metric']:36s} {r['value']:.4f}")


def _leaderboard(a: argparse.Namespace) -> None:
    from .metrics import format_leaderboard, leaderboard
    print(format_leaderboard(*leaderboard(a.store)))


def _demo(a: argparse.Namespace) -> None:
    from .demo import run_demo
    run_demo(store=a.store, n=a.n, serve=not a.no_serve, port=a.port)


def _shapes_card(a: argparse.Namespace) -> None:
    from .models import SHAPES_WEIGHTS
    from .shapes.card import write_card
    from .store import RunStore
    record = SHAPES_WEIGHTS.with_suffix(".json")
    if not record.is_file():
        raise AtlasError(f"no training record at {record}; run `clip-atlas shapes train`")
    rec = json.loads(record.read_text())
    if a.eval:
        rec["ground_truth"] = RunStore(a.eval).manifest().get("shapes_eval") or {}
    if a.validation:
        try:
            report = json.loads(Path(a.validation).read_text())
            rec["validation"] = {"seeds": report["seeds"], "n": report["n"], "summary": report["summary"]}
        except (OSError, ValueError, KeyError):
            raise AtlasError(f"{a.validation} is not a report written by `clip-atlas shapes validate`") from None
    record.write_text(json.dumps(rec, indent=2))
    print(f"wrote {write_card(SHAPES_WEIGHTS)}")


def build_parser() -> argparse.ArgumentParser:
    from .jobs.textspan import DEFAULT_M, DEFAULT_RANK
    from .properties import METHODS
    p = argparse.ArgumentParser(prog="clip-atlas", description="Decompose and interpret CLIP image embeddings.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("compute", help="decompose a folder of images into a Parquet run")
    c.add_argument("--model", required=True, help="NAME[:TAG], e.g. shapes, ViT-B-32:openai, ViT-B-16:random")
    c.add_argument("--images", required=True, help="folder of images (subfolder or labels.csv gives the label)")
    c.add_argument("--out", required=True, help="run folder, e.g. artifacts/my-run")
    c.add_argument("--layers", default="last4", help="head layers to store: lastK | all | L1,L2 (default last4)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--device", default="auto")
    c.add_argument("--limit", type=int, default=None, help="only the first N images (sorted by path)")
    c.add_argument("--labels", default=None, help="CSV with path,label (default: IMAGES/labels.csv if present)")
    c.add_argument("--chunk-size", type=int, default=None, help="images per committed chunk (default: by memory)")
    c.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on GPU")
    c.add_argument("--workers", type=int, default=2, help="image decoding threads")
    c.set_defaults(func=_compute)

    t = sub.add_parser("textspan", help="label each head's output space with texts (TextSpan)")
    t.add_argument("run")
    t.add_argument("--texts", default="auto", help="pool: auto (shapes for the Shapes model, else general) | general | shapes | a .txt or .csv file")
    t.add_argument("--m", type=int, default=DEFAULT_M, help="at most this many texts per head")
    t.add_argument("--rank", type=int, default=DEFAULT_RANK,
                   help="rank of the span the texts are projected on; capped per head at its numerical rank")
    t.add_argument("--layers", default=None, help="subset of the stored layers (default: all stored)")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_textspan)

    lb = sub.add_parser("label", help="assign each head a property from its TextSpan texts")
    lb.add_argument("run")
    lb.add_argument("--method", default="tags", choices=list(METHODS),
                    help="tags (default): majority of the head's texts, kept only when both halves of the images agree")
    lb.add_argument("--reference", default="general", help="tagged pool for --method similarity")
    lb.set_defaults(func=_label)

    mt = sub.add_parser("metrics", help="interpretability metrics of a run")
    mt.add_argument("run")
    mt.set_defaults(func=_metrics)

    ld = sub.add_parser("leaderboard", help="compare the runs of a store")
    ld.add_argument("store", nargs="?", default=DEFAULT_STORE)
    ld.set_defaults(func=_leaderboard)

    d = sub.add_parser("demo", help="the offline default: Shapes data, store, labels, metrics, dashboard")
    d.add_argument("--store", default=DEFAULT_STORE)
    d.add_argument("--n", type=int, default=2000)
    d.add_argument("--port", type=int, default=8501)
    d.add_argument("--no-serve", action="store_true", help="build the store only")
    d.set_defaults(func=_demo)

    m = sub.add_parser("models", help="list the named models")
    m.set_defaults(func=_models)

    s = sub.add_parser("shapes", help="the Shapes world: generate, train, eval").add_subparsers(dest="shapes_cmd", required=True)
    g = s.add_parser("generate", help="write a folder of scenes")
    g.add_argument("--n", type=int, default=2000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", required=True)
    g.set_defaults(func=_shapes_generate)
    t = s.add_parser("train", help="train the Shapes CLIP (CPU, about an hour)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="weights file (default: the bundled one)")
    t.set_defaults(func=_shapes_train)
    e = s.add_parser("eval", help="ground-truth evaluation of a run computed on a Shapes dataset")
    e.add_argument("run")
    e.set_defaults(func=_shapes_eval)
    v = s.add_parser("validate", help="the whole pipeline with defaults on fresh seeds, scored against ground truth")
    v.add_argument("--seeds", type=int, default=3)
    v.add_argument("--n", type=int, default=2000, help="scenes per seed")
    v.add_argument("--seed-base", type=int, default=101, help="first seed (training, demo and tuning used 0 and 11-13)")
    v.add_argument("--out", default="artifacts/shapes-validate")
    v.set_defaults(func=_shapes_validate)
    cd = s.add_parser("card", help="rewrite the model card (optionally with a run's ground-truth figures)")
    cd.add_argument("--eval", default=None, help="a run evaluated by `shapes eval`")
    cd.add_argument("--validation", default=None, help="a report.json written by `shapes validate`")
    cd.set_defaults(func=_shapes_card)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except AtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
