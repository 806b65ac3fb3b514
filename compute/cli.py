"""The `clip-atlas` command: parsing only. Each subcommand calls one job or experiment, and `main` is the one place
that turns AtlasError and Ctrl-C into exit codes. Commands import their module inside them so that `--help` and
the argument refusals answer before torch (seconds to import) is loaded."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compute.checks import below
from compute.errors import AtlasError
from compute.organisms import ORGANISMS

DEFAULT_STORE = "artifacts"


def _check_out(path: str | Path | None, kind: str = "file") -> None:
    """Refuses, before any work, an output that cannot be created: a folder where a file goes (or the reverse),
    or a parent folder that is a file."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and p.is_dir() != (kind == "folder"):
        raise AtlasError(f"{p} is a {'file' if kind == 'folder' else 'folder'}: give a {kind} path")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AtlasError(f"cannot write {p}: {parent} is a file, not a folder")
            break


def _compute(a: argparse.Namespace) -> None:
    from compute.jobs.compute import ComputeConfig, run_compute
    _check_out(a.out, "folder")
    m = run_compute(ComputeConfig(model=a.model, images=a.images, out=a.out, layers=a.layers,
                                  batch_size=a.batch_size, device=a.device, limit=a.limit, labels=a.labels,
                                  chunk_size=a.chunk_size, precision=a.precision, workers=a.workers,
                                  store_dtype=a.store_dtype))
    if m["rank"] == 0:
        print(f"{m['status']}: {m['image_count']} images, {len(m['skipped'])} skipped -> {a.out}")


def _eval_ablation(a: argparse.Namespace) -> None:
    from compute.eval.ablation import ablation_heads, format_report, read_grouped_set, run_ablation
    from compute.models import load_model
    from compute.runtime import pick_device
    from compute.store.layout import write_json_atomic
    if not str(a.out).endswith(".json"):
        raise AtlasError(f"--out must end in .json: {a.out}")
    _check_out(a.out)
    data = read_grouped_set(a.images, a.groups, a.classes)
    loaded = load_model(a.model, device=pick_device(a.device))
    if a.search:
        from compute.eval.head_search import run_search
        report = run_search(loaded, data, seed=a.seed, random_k=a.random, stop=a.stop,
                            property_heads=ablation_heads(loaded, a.ablate, a.run) if a.ablate else None)
    else:
        report = run_ablation(loaded, data, a.ablate, a.run, random_k=a.random, seed=a.seed, mean_from=a.mean_from)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(report, Path(a.out))
    print(format_report(report))
    print(f"-> {a.out}")


def _models(a: argparse.Namespace) -> None:
    from compute.models import REGISTRY, family_of
    from compute.maths.towers import FAMILIES
    for name, (arch, _tag) in REGISTRY.items():
        fam, why = family_of(arch)
        print(f"{name:32s} {arch:24s} {fam:14s} {'decomposes' if why is None else 'refused: ' + why}")
    print("\nfamilies (exact: the parts sum to the embedding to float round-off, with these statistics frozen):")
    for fam, exact in FAMILIES.items():
        print(f"  {fam:14s} {exact}")
    print("refused: ResNet, ConvNeXt, FastViT/MobileCLIP towers, CoCa's attentional pooler (not a sum of token writes)")
    print("also: any open_clip model as NAME:TAG, NAME:/path/to/weights, NAME:random, local-dir:/path")


def _shapes_generate(a: argparse.Namespace) -> None:
    from compute.shapes.dataset import generate
    from compute.shapes.world import WorldSpec
    spec = WorldSpec(two_object_prob=0.0) if a.objects == "1" else WorldSpec()
    _check_out(a.out, "folder")
    out = generate(a.n, a.seed, a.out, spec)
    print(f"wrote {a.n} scenes to {out} (images/, masks/, labels.csv, objects.csv, scenes.parquet)")


def _eval_segmentation(a: argparse.Namespace) -> None:
    from compute.eval.segmentation import check_methods, evaluate_segmentation, format_rows, pair_examples, write_rows
    from compute.models import load_model
    from compute.runtime import pick_device
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    check_methods(methods)
    for out in (a.out, a.per_image):
        if out is not None and not str(out).endswith((".parquet", ".csv")):
            raise AtlasError(f"--out and --per-image must end in .parquet or .csv: {out}")
        _check_out(out)
    if a.per_image and Path(a.per_image).resolve() == Path(a.out).resolve():
        raise AtlasError("--per-image must be another file than --out")
    pairing = pair_examples(a.images, a.masks, a.labels, a.limit, need_labels=a.classes is None)
    loaded = load_model(a.model, device=pick_device(a.device))
    per_image: list[dict] | None = [] if a.per_image else None
    rows, skipped = evaluate_segmentation(loaded, pairing, methods, template=a.template, layers=a.layers,
                                          batch_size=a.batch_size, classes=a.classes, per_image=per_image)
    print(format_rows(rows))
    if skipped:
        print("skipped: " + ", ".join(f"{v} ({k})" for k, v in sorted(skipped.items())))
    print(f"-> {write_rows(rows, a.out)}")
    if per_image:
        print(f"-> {write_rows(per_image, a.per_image)} (per image)")


def _shapes_train(a: argparse.Namespace) -> None:
    from compute.models import organism_weights
    from compute.shapes.train import recipe, train
    overrides = {k: v for k, v in (("steps", a.steps), ("seed", a.seed), ("threads", a.threads)) if v is not None}
    _check_out(a.out)
    train(recipe(a.arch, **overrides), Path(a.out) if a.out else organism_weights(a.arch))


def _shapes_spurious(a: argparse.Namespace) -> None:
    from compute.shapes.spurious import format_table, run_spurious
    _check_out(a.out, "folder")
    report = run_spurious(a.out, seed=a.seed, n_store=a.n, n_test=a.test, random_k=a.random, retrain=a.retrain,
                          stop=a.stop)
    print(format_table(report))
    print(f"-> {Path(a.out) / 'ablation.json'}")


def _shapes_eval(a: argparse.Namespace) -> None:
    from compute.shapes.groundtruth import evaluate_run
    summary = evaluate_run(a.run, progress=True)
    print(json.dumps(summary, indent=2))


def _shapes_validate(a: argparse.Namespace) -> None:
    from compute.shapes.validate import format_report, validate
    _check_out(a.out, "folder")
    report = validate(a.out, seeds=a.seeds, n=a.n, seed_base=a.seed_base)
    print(format_report(report))
    print(f"report: {Path(a.out) / 'report.json'}")


def _shapes_zoo(a: argparse.Namespace) -> None:
    from compute.shapes.zoo import format_report, run_zoo
    _check_out(a.out, "folder")
    report = run_zoo(a.out, seeds=tuple(range(a.seed_base, a.seed_base + a.seeds)), n=a.n)
    print(format_report(report))
    print(f"report: {Path(a.out) / 'zoo.json'}")


def _textspan(a: argparse.Namespace) -> None:
    from compute.jobs.textspan import run_textspan
    m = run_textspan(a.run, a.texts, m=a.m, rank=a.rank, layers=a.layers, device=a.device)
    ts = m["textspan"]
    print(f"textspan: {len(ts['layers'])} layers x {m['heads']} heads, up to {ts['m']} texts each -> {a.run}/textspan.parquet")
    print(f"stability (top-{ts['stability_k']} picks shared by two halves of the images): mean {ts['mean_stability']:.2f}, "
          f"{ts['unstable_heads']} heads flagged unstable")


def _index(a: argparse.Namespace) -> None:
    from compute.jobs.index import build_index
    from compute.maths.decompose import resolve_layers
    from compute.store.layout import RunStore
    layers = resolve_layers(a.layers, RunStore(a.run).manifest()["layers"]) if a.layers else None
    r = build_index(a.run, layers)
    print(f"index: {r['built']} of {r['heads']} heads built ({r['heads'] - r['built']} were current) -> {r['path']}")


def _neurons(a: argparse.Namespace) -> None:
    from compute.jobs.neurons import run_neurons
    m = run_neurons(a.run, layers=a.layers, images=a.images, texts=a.texts, top_k=a.top_k,
                    batch_size=a.batch_size, device=a.device, memory_gib=a.memory)
    n = m["neurons"]
    print(f"neurons: layers {', '.join(map(str, n['layers']))} over {n['settings']['images']} images "
          f"-> {Path(a.run) / 'neurons'}")


def _report(a: argparse.Namespace) -> None:
    from compute.jobs.report import write_report
    _check_out(a.out)
    print(f"report: {write_report(a.run, a.out)}")


def _label(a: argparse.Namespace) -> None:
    from compute.jobs.label import run_label
    labels = run_label(a.run, a.method, a.reference)
    counts: dict[str, int] = {}
    for x in labels:
        counts[x.property] = counts.get(x.property, 0) + 1
    print("heads per property: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])))


def _metrics(a: argparse.Namespace) -> None:
    from compute.jobs.metrics import run_metrics
    t = run_metrics(a.run)
    for r in t.to_pylist():
        if r["scope"] == "model":
            print(f"{r['metric']:36s} {r['value']:.4f}")


def _leaderboard(a: argparse.Namespace) -> None:
    from compute.jobs.metrics import format_leaderboard, leaderboard
    print(format_leaderboard(*leaderboard(a.store)))


def _demo(a: argparse.Namespace) -> None:
    from compute.demo import run_demo
    _check_out(a.store, "folder")
    run_demo(store=a.store, n=a.n, serve=not a.no_serve, port=a.port, address=a.address)


def _shapes_card(a: argparse.Namespace) -> None:
    from compute.models import organism_weights
    from compute.shapes.card import update_card
    print(f"wrote {update_card(a.eval, a.validation, a.neurons, weights=organism_weights(a.arch))}")


def _fresh_seeds(p: argparse.ArgumentParser, n: int, seed_base: int, out: str, why: str) -> None:
    """The arguments of a command that runs the Shapes pipeline on fresh scene seeds."""
    p.add_argument("--seeds", type=POSITIVE, default=3)
    p.add_argument("--n", type=POSITIVE, default=n, help="scenes per seed")
    p.add_argument("--seed-base", type=NONNEGATIVE, default=seed_base, help=f"first seed ({why})")
    p.add_argument("--out", default=out)


def _at_least(low: int):
    """An argparse type: a whole number no smaller than `low` (argparse turns the message into a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        why = below(value, low)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value
    return parse


POSITIVE, NONNEGATIVE = _at_least(1), _at_least(0)


def _gib(text: str) -> float:
    """An argparse type: a memory size in GiB, more than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} GiB: give a size above 0, e.g. 0.75 or 8")
    return value


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of the rest of the tool (argparse alone prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _command(parent, name: str, help: str, func, run: bool = False) -> argparse.ArgumentParser:
    """A subcommand that calls `func(args)`; `run`: its first argument is a run folder."""
    cmd = parent.add_parser(name, help=help)
    if run:
        cmd.add_argument("run")
    cmd.set_defaults(func=func)
    return cmd


def build_parser() -> argparse.ArgumentParser:
    from compute.eval.segmentation import METHODS as SEG_METHODS
    from compute.jobs.label import METHODS
    from compute.jobs.neurons import DEFAULT_TEXTS as NEURON_TEXTS
    from compute.jobs.neurons import TOP_K as NEURON_TOP_K
    from compute.jobs.textspan import DEFAULT_M, DEFAULT_RANK
    p = _Parser(prog="clip-atlas", description="Decompose and interpret CLIP image embeddings.")
    sub = p.add_subparsers(dest="cmd", required=True)

    c = _command(sub, "compute", "decompose a folder of images into a Parquet run", _compute)
    c.add_argument("--model", required=True, help="NAME[:TAG], e.g. shapes, ViT-B-32:openai, ViT-B-16:random")
    c.add_argument("--images", required=True, help="folder of images (subfolder or labels.csv gives the label)")
    c.add_argument("--out", required=True, help="run folder, e.g. artifacts/my-run")
    c.add_argument("--layers", default="last4", help="head layers to store: lastK | all | L1,L2 (default last4)")
    c.add_argument("--batch-size", type=POSITIVE, default=32)
    c.add_argument("--device", default="auto")
    c.add_argument("--limit", type=POSITIVE, default=None, help="only the first N images (sorted by path)")
    c.add_argument("--labels", default=None, help="CSV with path,label: the images it lists, labelled (default: IMAGES/labels.csv if present)")
    c.add_argument("--chunk-size", type=POSITIVE, default=None, help="images per committed chunk (default: by memory)")
    c.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="autocast on GPU")
    c.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                   help="element type of the stored head and component contributions (float16: half the disk; "
                        "docs/store.md gives its tolerance)")
    c.add_argument("--workers", type=POSITIVE, default=None,
                   help="image decoding threads (default: the cores available, divided among the ranks of a node)")

    t = _command(sub, "textspan", "label each head's output space with texts (TextSpan)", _textspan, run=True)
    t.add_argument("--texts", default="auto", help="pool: auto (shapes for the Shapes model, else general) | general | shapes | a .txt or .csv file")
    t.add_argument("--m", type=POSITIVE, default=DEFAULT_M, help="at most this many texts per head")
    t.add_argument("--rank", type=POSITIVE, default=DEFAULT_RANK,
                   help="rank of the span the texts are projected on; capped per head at its numerical rank")
    t.add_argument("--layers", default=None, help="subset of the stored layers (default: all stored)")
    t.add_argument("--device", default="auto")

    lb = _command(sub, "label", "assign each head a property from its TextSpan texts", _label, run=True)
    lb.add_argument("--method", default="tags", choices=list(METHODS),
                    help="tags (default): majority of the head's texts, kept only when both halves of the images agree")
    lb.add_argument("--reference", default="general", help="tagged pool for --method similarity")

    ix = _command(sub, "index", "memory-mapped per-head indexes for fast exact neighbour queries", _index, run=True)
    ix.add_argument("--layers", default=None, help="only these stored layers (default: all stored)")

    nr = _command(sub, "neurons", "second-order effects of MLP neurons, with text descriptions", _neurons, run=True)
    nr.add_argument("--layers", default=None,
                    help="MLP layers (default: from 2/3 of the depth to the second-to-last, as the paper studies)")
    nr.add_argument("--images", type=POSITIVE, default=None, help="use the first N of the run's images (default: all)")
    nr.add_argument("--texts", type=POSITIVE, default=NEURON_TEXTS, help="texts in each neuron's sparse description")
    nr.add_argument("--top-k", type=POSITIVE, default=NEURON_TOP_K, help="top images kept per neuron")
    nr.add_argument("--batch-size", type=POSITIVE, default=32)
    nr.add_argument("--device", default="auto")
    nr.add_argument("--memory", type=_gib, default=None,
                    help="GiB of per-neuron state held at once (default 0.75); more means fewer passes over the images")

    rp = _command(sub, "report", "a run's summary as one HTML page", _report, run=True)
    rp.add_argument("--out", default=None, help="where to write it (default RUN/report.html)")

    _command(sub, "metrics", "interpretability metrics of a run", _metrics, run=True)

    ld = _command(sub, "leaderboard", "compare the runs of a store", _leaderboard)
    ld.add_argument("store", nargs="?", default=DEFAULT_STORE)

    d = _command(sub, "demo", "the offline default: Shapes data, store, labels, metrics, dashboard", _demo)
    d.add_argument("--store", default=DEFAULT_STORE)
    d.add_argument("--n", type=POSITIVE, default=2000)
    d.add_argument("--port", type=POSITIVE, default=8501)
    d.add_argument("--address", default="localhost", help="where the dashboard listens (default localhost; "
                   "0.0.0.0 shares it on your network: it has no login)")
    d.add_argument("--no-serve", action="store_true", help="build the store only")

    ev = sub.add_parser("eval", help="the papers' experiments: zero-shot segmentation, head ablation")
    evs = ev.add_subparsers(dest="eval_cmd", required=True)
    es = _command(evs, "segmentation", "heatmaps of five methods scored against foreground masks", _eval_segmentation)
    es.add_argument("--model", required=True, help="NAME[:TAG], e.g. shapes, ViT-B-16:laion2b_s34b_b88k")
    es.add_argument("--images", required=True, help="folder of images (any tree)")
    es.add_argument("--masks", required=True, help="folder of PNG masks at the images' relative paths (non-zero = foreground)")
    es.add_argument("--labels", default=None, help="path,label CSV, paths relative to the CSV's folder (default: subfolder "
                                                   "names); for a Shapes folder, DIR/objects.csv (docs/reproduce.md)")
    es.add_argument("--methods", default=",".join(SEG_METHODS), help=f"comma list of {', '.join(SEG_METHODS)}")
    es.add_argument("--classes", default=None, help="imagenet | a label,prompt CSV: use the model's predicted class "
                                                    "among these as each image's text (the papers' ImageNet-Segmentation protocol)")
    es.add_argument("--template", default=None, help="prompt with {} for the label (default: 'a {}' for Shapes models, "
                                                     "'a photo of a {}.' otherwise)")
    es.add_argument("--layers", default="all", help="layers whose heads the decomposition map sums (default all)")
    es.add_argument("--limit", type=POSITIVE, default=None, help="only the first N images that have a mask and a label")
    es.add_argument("--batch-size", type=POSITIVE, default=32)
    es.add_argument("--device", default="auto")
    es.add_argument("--out", required=True, help="results table, .parquet or .csv")
    es.add_argument("--per-image", default=None, help="also each image's figures per method (path, text, method, "
                                                      "pixel_accuracy, iou_foreground, ap, ap_paper), .parquet or .csv")

    ea = _command(evs, "ablation", "zero-shot accuracy by group with a property's heads mean-ablated", _eval_ablation)
    ea.add_argument("--model", required=True)
    ea.add_argument("--images", required=True, help="the folder the --groups paths are relative to")
    ea.add_argument("--groups", required=True, help="CSV path,label,group (e.g. Waterbirds' test split: docs/reproduce.md)")
    ea.add_argument("--classes", required=True, help="CSV label,prompt: one zero-shot prompt per class")
    ea.add_argument("--ablate", default=None, help="a property of --run's labels (e.g. background) or heads L.H,L.H")
    ea.add_argument("--run", default=None, help="a labelled run of the same model (for a property, or --mean-from run)")
    ea.add_argument("--random", type=NONNEGATIVE, default=5, help="random ablations of as many heads (the best is reported)")
    ea.add_argument("--seed", type=NONNEGATIVE, default=0, help="seed of the random ablations")
    ea.add_argument("--mean-from", default="eval", choices=["eval", "run"],
                    help="replace ablated heads by their mean over the evaluated images (default, as the paper) or the run's")
    ea.add_argument("--search", action="store_true",
                    help="find the heads that narrow the gap between groups on half of the images (seeded), and report "
                         "every condition on the other half only, with bootstrap intervals (docs/reproduce.md)")
    ea.add_argument("--stop", default="nested", choices=["nested", "gain"],
                    help="how --search picks the number of heads: nested (default: on a held-back part of the "
                         "selection half) or gain (the first rule: stop below half a point of gain)")
    ea.add_argument("--device", default="auto")
    ea.add_argument("--out", required=True, help="report, .json")

    _command(sub, "models", "list the named models", _models)

    s = sub.add_parser("shapes", help="the Shapes world: generate, train, eval").add_subparsers(dest="shapes_cmd", required=True)
    g = _command(s, "generate", "write a folder of scenes", _shapes_generate)
    g.add_argument("--n", type=POSITIVE, default=2000)
    g.add_argument("--seed", type=NONNEGATIVE, default=0)
    g.add_argument("--out", required=True)
    g.add_argument("--objects", default="mixed", choices=["mixed", "1"],
                   help="mixed (default: one or two objects, as in training) | 1 (one object a scene, for segmentation)")
    t = _command(s, "train", "train a Shapes organism (CPU: the base one about 90 min, the zoo's 10-30 min)", _shapes_train)
    t.add_argument("--arch", default="shapes", choices=list(ORGANISMS),
                   help="which organism (default: the base Shapes CLIP); see the model cards in compute/shapes/weights")
    t.add_argument("--steps", type=POSITIVE, default=None, help="default: the organism's recipe (2000, zoo 600)")
    t.add_argument("--seed", type=NONNEGATIVE, default=None, help="default: 0")
    t.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads (default 2; 1 to train two at once)")
    t.add_argument("--out", default=None, help="weights file (default: the bundled one for --arch)")
    _command(s, "eval", "ground-truth evaluation of a run computed on a Shapes dataset", _shapes_eval, run=True)
    _fresh_seeds(_command(s, "validate", "the whole pipeline with defaults on fresh seeds, scored against ground truth",
                          _shapes_validate), n=2000, seed_base=101, out="artifacts/shapes-validate",
                 why="training, demo and tuning used 0 and 11-13")
    _fresh_seeds(_command(s, "zoo", "every organism on fresh seeds: each leaderboard metric against ground truth "
                          "(docs/metrics.md)", _shapes_zoo), n=1000, seed_base=701, out="artifacts/shapes-zoo",
                 why="the plan in docs/metrics.md: 701-703")
    sp = _command(s, "spurious", "Waterbirds on Shapes: ablate the background heads of a model with a spurious cue",
                  _shapes_spurious)
    sp.add_argument("--seed", type=NONNEGATIVE, default=1,
                    help="seed of the scenes for its store and of the balanced test set (fine-tuning used 0)")
    sp.add_argument("--n", type=POSITIVE, default=2000, help="scenes in the store TextSpan and labels read")
    sp.add_argument("--test", type=POSITIVE, default=1000, help="balanced test images (class x background)")
    sp.add_argument("--random", type=NONNEGATIVE, default=5, help="random ablations to compare with")
    sp.add_argument("--stop", default="nested", choices=["nested", "gain"],
                    help="how the search picks the number of heads (see eval ablation --stop)")
    sp.add_argument("--retrain", action="store_true", help="fine-tune the spurious model again (about 10 min on CPU)")
    sp.add_argument("--out", default="artifacts/shapes-spurious")
    cd = _command(s, "card", "rewrite the model card (optionally with a run's ground-truth figures)", _shapes_card)
    cd.add_argument("--arch", default="shapes", choices=list(ORGANISMS), help="whose card (default: the base Shapes CLIP)")
    cd.add_argument("--eval", default=None, help="a run evaluated by `shapes eval`")
    cd.add_argument("--validation", default=None, help="a report.json written by `shapes validate`")
    cd.add_argument("--neurons", nargs="*", default=None, help="Shapes runs with neuron tables: their ground-truth figures")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status (0 done, 2 refused with a one-line message)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:      # --help, or a usage error already printed
        return int(e.code or 0)
    try:
        args.func(args)
    except AtlasError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:           # the file system said no (disk full, permissions, a path taken): one line, not a traceback
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (a compute job keeps its finished chunks: the same command resumes from them)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
