"""A Shapes CLIP with a spurious cue, and the Waterbirds-style experiment on it.

The paper's spurious-cue experiment (Waterbirds: land birds mostly on land, water birds mostly
on water) becomes, in the Shapes world: circles mostly on water, squares mostly on grass.
The bundled Shapes CLIP is fine-tuned on such a world with captions that always name the shape
and only sometimes the background, so the background becomes a cheap predictor of the shape
word, as land and water are of bird names in web captions. The fine-tune keeps the hard-negative
groups of the original recipe for every attribute except shape and background (a group varying
the shape on a fixed background would teach the model to ignore the background).

The experiment (`run_spurious`) then does what the paper does: zero-shot "a circle" vs "a square"
on a balanced test set (class x background groups), average and worst-group accuracy for the
model as is, with its background heads mean-ablated, and with the best of K random ablations
of as many heads from the same layers; and what the paper could not: the heads found from group
labels (`eval/head_search.py`: chosen on half of the test set, `searched`) against the best of K
random ablations of as many heads (`random_searched`). Every condition is reported on the half the
search never saw, with bootstrap intervals.
"""
from __future__ import annotations

import csv
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from compute.eval.ablation import format_report, property_heads, read_grouped_set
from compute.eval.head_search import run_search
from compute.headnames import head_name
from compute.models import SHAPES_WEIGHTS, SPURIOUS_WEIGHTS, load_model
from compute.shapes.accuracy import attribute_accuracy, to_model_input
from compute.shapes.pipeline import build_shapes_store
from compute.shapes.train import TrainConfig, build_model, fit, sample_group, save_weights
from compute.shapes.world import (ATTRIBUTES, OBJECT_ATTRIBUTES, Renderer, Scene, Tie, WorldSpec, attribute_prompt,
                                  describe)
from compute.store.layout import write_json_atomic

SPURIOUS_NAME = "shapes-spurious"
CLASSES = ("circle", "square")
CUES = {"circle": "water", "square": "grass"}      # the tie: class -> its usual background


def spurious_world(tie: float) -> WorldSpec:
    """One-object scenes of circles and squares; each class sits on its usual background with probability `tie`
    (otherwise on any of the six backgrounds, its usual one included)."""
    return WorldSpec(two_object_prob=0.0, weights={"shape": {c: 1.0 for c in CLASSES}},
                     ties=tuple(Tie("shape", c, "background", bg, tie) for c, bg in CUES.items()))


def balanced_scenes(n: int, seed: int) -> list[Scene]:
    """n one-object scenes, equally many in each (class, cue background) group, other attributes uniform."""
    rng = random.Random(seed)
    base = WorldSpec(two_object_prob=0.0)
    groups = [(c, bg) for c in CLASSES for bg in CUES.values()]
    out = []
    for i in range(n):
        c, bg = groups[i % len(groups)]
        out.append(base.sample(rng).replace("shape", c).replace("background", bg))
    return out


@dataclass
class SpuriousConfig(TrainConfig):
    """The training recipe's settings, shorter and gentler (a fine-tune), plus the cue."""
    steps: int = 300
    lr: float = 3e-4
    warmup: int = 20
    tie: float = 0.95
    background_in_caption: float = 0.25     # share of captions that name the background
    vary_weights: dict[str, float] = field(default_factory=lambda: {
        "color": 1.0, "size": 1.0, "pattern": 2.0, "position": 2.0})


def spurious_caption(scene: Scene, rng: random.Random, p_background: float) -> str:
    """The shape always, a random subset of the other attributes, the background only sometimes."""
    obj = scene.objects[0]
    keep = tuple(a for a in OBJECT_ATTRIBUTES if a == "shape" or rng.random() < 0.6)
    phrase = describe(obj, rng, keep)
    return f"a {phrase} on {scene.background}" if rng.random() < p_background else f"a {phrase}"


def finetune(cfg: SpuriousConfig, out: Path, base_weights: Path | None = None, log=print) -> dict:
    """Fine-tune the bundled Shapes CLIP on the tied world; writes fp16 weights and a JSON record beside them."""

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model()
    base_weights = base_weights or SHAPES_WEIGHTS
    model.load_state_dict({k: v.float() for k, v in load_file(str(base_weights)).items()})
    pcfg = model.visual.preprocess_cfg
    spec, rng, renderer = spurious_world(cfg.tie), random.Random(cfg.seed), Renderer(cfg.seed)
    t0 = time.time()

    def batches() -> tuple[torch.Tensor, torch.Tensor]:
        scenes = [s for _ in range(cfg.batch_size // cfg.group_size)
                  for s in sample_group(spec, rng, cfg.group_size, cfg.vary_weights)]
        imgs = np.stack([renderer.render(s, rng)[0] for s in scenes])
        tokens = tokenizer([spurious_caption(s, rng, cfg.background_in_caption) for s in scenes])
        return to_model_input(imgs, pcfg["mean"], pcfg["std"], "cpu"), tokens

    fit(model, cfg, batches, "fine-tune")
    save_weights(model, out)
    model.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    record = {"model": SPURIOUS_NAME, "base": base_weights.name, "config": asdict(cfg),
              "wall_minutes": (time.time() - t0) / 60,
              "heldout": attribute_accuracy(model, tokenizer, n=1000, seed=12345),
              "parameters": sum(p.numel() for p in model.parameters())}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    log(json.dumps({"heldout": record["heldout"], "wall_minutes": record["wall_minutes"]}))
    return record


# ---------------------------------------------------------------- the experiment

def write_test_set(out: Path, n: int, seed: int) -> Path:
    """A balanced class x background test set: out/images/*.png, out/groups.csv, out/classes.csv."""

    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = balanced_scenes(n, seed)
    renderer, rng = Renderer(seed), random.Random(f"render-{seed}")
    rows = []
    for i, s in enumerate(scenes):
        rel = f"images/{i:06d}.png"
        Image.fromarray(renderer.render(s, rng)[0]).save(out / rel, compress_level=1)
        rows.append((rel, s.get("shape"), f"{s.get('shape')} on {s.background}"))
    with open(out / "groups.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "group"), *rows])
    with open(out / "classes.csv", "w", newline="") as f:
        csv.writer(f).writerows([("label", "prompt"), *[(c, attribute_prompt("shape", c)) for c in CLASSES]])
    return out


def run_spurious(out: str | Path, seed: int = 1, n_store: int = 2000, n_test: int = 1000, random_k: int = 5,
                 retrain: bool = False, stop: str = "nested", progress: bool = True) -> dict:
    """Store, TextSpan and labels of the spurious model on ordinary scenes (seed), then `eval ablation` of its
    background heads on a balanced test set (seed); writes out/ablation.json and out/ablation.md."""
    out = Path(out)
    if retrain or not SPURIOUS_WEIGHTS.is_file():
        finetune(SpuriousConfig(), SPURIOUS_WEIGHTS)
        write_spurious_card(SPURIOUS_WEIGHTS)
    run = build_shapes_store(out / "data", out / "run", n_store, seed=seed, model=SPURIOUS_NAME, metrics=False,
                             progress=progress)
    test = write_test_set(out / "test", n_test, seed)
    data = read_grouped_set(test, test / "groups.csv", test / "classes.csv")
    heads, layers = property_heads(str(run), "background")
    report = run_search(load_model(SPURIOUS_NAME), data, seed=seed, random_k=random_k, property_heads=heads,
                        property_layers=layers, stop=stop, progress=progress)
    write_json_atomic(report, out / "ablation.json")
    (out / "ablation.md").write_text(format_table(report) + "\n")
    if progress:
        print(format_report(report))
    return report


def format_table(report: dict) -> str:
    """The paper-style table: one row per condition, each group's accuracy, average and worst group."""
    groups = report["group_names"]
    lines = ["| condition | heads | " + " | ".join(groups) + " | average | worst group |",
             "|---|---|" + "---|" * len(groups) + "---|---|"]
    for c in report["conditions"]:
        cells = " | ".join(f"{100 * c['groups'][g]:.1f}" for g in groups)
        heads = ", ".join(head_name(*lh) for lh in c["heads"]) or "none"
        lines.append(f"| {c['name']} | {heads} | {cells} | {100 * c['average']:.1f} | **{100 * c['worst_group']:.1f}** |")
    return "\n".join(lines)


def write_spurious_card(weights: Path, report: dict | None = None) -> Path:
    """MODEL_CARD-shapes-spurious.md beside the weights, from the fine-tune record (and an experiment's report)."""
    rec = json.loads(weights.with_suffix(".json").read_text())
    cfg, acc = rec["config"], rec["heldout"]
    if report is not None:
        rec["experiment"] = {k: report[k] for k in ("seed", "images", "conditions", "group_names", "random_k")}
        weights.with_suffix(".json").write_text(json.dumps(rec, indent=2))
    lines = [
        f"# Model card: {SPURIOUS_NAME}",
        "",
        "The bundled Shapes CLIP fine-tuned to lean on a spurious cue, for the Waterbirds-style experiment",
        "(`clip-atlas shapes spurious`). Load it with `--model shapes-spurious`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `clip-atlas-shapes` ({rec['parameters'] / 1e6:.1f} M parameters), weights fp16 |",
        f"| base | `{rec['base']}` |",
        f"| fine-tune | {cfg['steps']} steps x {cfg['batch_size']} (groups of {cfg['group_size']}), lr {cfg['lr']}, seed {cfg['seed']},"
        f" {rec['wall_minutes']:.0f} min on 2 CPU cores |",
        f"| the cue | one-object scenes of circles and squares; a circle sits on water and a square on grass with"
        f" probability {cfg['tie']} (else on any background); captions always name the shape and name the background"
        f" {100 * cfg['background_in_caption']:.0f}% of the time; groups vary colour, size, pattern and position, never"
        f" shape or background |",
        "",
        "## Held-out accuracy (1,000 one-object scenes of the independent world: all shapes, no tie)",
        "",
        "| attribute | caption accuracy | zero-shot |",
        "|---|---|---|",
    ]
    lines += [f"| {a} | {acc['caption'][a]:.3f} | {acc['zero_shot'][a]:.3f} |" for a in ATTRIBUTES]
    exp = rec.get("experiment")
    if exp:
        lines += ["", f"## The experiment (seed {exp['seed']}, {exp['images']} balanced test images, best of "
                  f"{exp['random_k']} random ablations)", "", format_table(exp)]
    lines += ["", "Fine-tuning only saw circles and squares, so its held-out shape accuracy over all four shapes",
              "is not comparable with the base model's; colour, size, pattern and position are the attributes it kept."]
    out = weights.parent / "MODEL_CARD-shapes-spurious.md"
    out.write_text("\n".join(lines) + "\n")
    return out
