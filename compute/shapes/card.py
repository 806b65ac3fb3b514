"""Writes MODEL_CARD.md for the Shapes CLIP from the JSON record the trainer leaves beside the weights."""
from __future__ import annotations

import json
from pathlib import Path

from compute.errors import AtlasError
from compute.models import SHAPES_WEIGHTS
from compute.shapes.neurons import evaluate_neurons
from compute.shapes.world import ATTRIBUTES
from compute.store.layout import RunStore

RECIPE_NOTES = """\
## Recipe, and what the choices did
- **Hard-negative groups.** A batch of 256 is 32 groups of 8 scenes: a base scene and 7 variants that
  each differ from it in exactly one attribute (attribute drawn with weights colour 1, background 1,
  size 1, shape 2, pattern 2, position 2). Captions always name every attribute, in varied word order
  and templates. The planning runs (recorded in the issue) trained on independent scenes: colour,
  background and size were learned, shape (0.28) and position (0.11) stayed at chance, because the
  contrastive task never needed them. Groups sharing colour and background lifted shape to 0.64 and
  pattern to 0.63 but not position (0.18). Making every member of a group differ in one attribute from
  the base turns each batch into the caption-accuracy test itself.
- **Salience.** Objects have a dark outline and two clearly different sizes (radius 7.5 vs 12.5 px of 64);
  patterns use a dark shade of the object's own colour, so they do not compete with colour.
- **More, narrower heads:** 8 heads of width 16 in a 128-wide, 6-layer ViT (patch 8 on 64 px), so heads
  have room to specialise. Text tower: 3 layers, width 128, context 32 (captions are short).
- **Optimiser:** AdamW (lr 1e-3, betas 0.9/0.98, weight decay 0.05 on matrices only), 100 warm-up steps,
  cosine decay, gradient clipping at 1, learnable temperature capped at 100.
- **Generation on the fly** (about 0.2 ms a scene, 5% of a step), seeded, so no dataset cache is needed.
- **Weights** are saved in fp16 (16 MB); every figure on this card is measured on the fp16 weights
  loaded back into the fp32 model, as `--model shapes` loads them.

## Limits of this card
- One full run of this recipe was trained (the CPU budget allows about one an hour); the choices above
  were not ablated one by one, so their separate effects beyond the planning runs are not measured.
  The curve shows the order in which attributes were learned: colour, background, size and pattern
  first, position between steps 400 and 800, shape last.
- Head specialisation is dominated by background (the most salient attribute); colour, shape, size and
  position each have one or two clearly specialised heads. The threshold is defined in
  `compute/shapes/groundtruth.py`.
"""


ZOO_NOTES = """\
## Recipe
The base Shapes CLIP's recipe (hard-negative groups of 8, AdamW, warm-up and cosine decay; see
MODEL_CARD.md) on 15% of its scenes: 600 steps of 128 against 2000 of 256. Every organism of the zoo
(`shapes-small`, `shapes-deep`, `shapes-p16`, `shapes-siglip`) shares it, so what differs between
them is the architecture alone. The base Shapes CLIP, trained on about seven times as many scenes, is on the leaderboard beside
them for reference; its row says so.
"""


def _tower_line(rec: dict) -> str:
    t = rec.get("tower")
    return f"; vision tower {t}" if t else ""


def update_card(eval_run: str | None = None, validation: str | None = None, neuron_runs: list[str] | None = None,
                weights: Path = SHAPES_WEIGHTS) -> Path:
    """Add a run's ground-truth figures, a `shapes validate` report and neuron runs' figures to the training
    record beside the weights, then rewrite the card from it."""
    record = weights.with_suffix(".json")
    if not record.is_file():
        raise AtlasError(f"no training record at {record}; run `clip-atlas shapes train`")
    rec = json.loads(record.read_text())
    if eval_run:
        rec["ground_truth"] = RunStore(eval_run).manifest().get("shapes_eval") or {}
        rec["ground_truth_run"] = Path(eval_run).name
    if validation:
        try:
            report = json.loads(Path(validation).read_text())
            rec["validation"] = {"seeds": report["seeds"], "n": report["n"], "summary": report["summary"]}
        except (OSError, ValueError, KeyError):
            raise AtlasError(f"{validation} is not a report written by `clip-atlas shapes validate`") from None
    if neuron_runs:
        rec["neurons"] = []
        for run in neuron_runs:
            _, summary = evaluate_neurons(run)
            rec["neurons"].append({"run": Path(run).name, **{k: v for k, v in summary.items() if not isinstance(v, list)}})
    record.write_text(json.dumps(rec, indent=2))
    return write_card(weights)


def card_path(weights: Path) -> Path:
    """MODEL_CARD.md for the base Shapes CLIP, MODEL_CARD-<organism>.md for the others."""
    organism = json.loads(weights.with_suffix(".json").read_text()).get("organism", "shapes")
    return weights.parent / ("MODEL_CARD.md" if organism == "shapes" else f"MODEL_CARD-{organism}.md")


def write_card(weights: Path) -> Path:
    rec = json.loads(weights.with_suffix(".json").read_text())
    cap, zs, targets = rec["heldout"]["caption"], rec["heldout"]["zero_shot"], rec["targets"]
    cfg, arch, organism = rec["config"], rec["model"], rec.get("organism", "shapes")
    lines = [
        f"# Model card: {organism}",
        "",
        "A small CLIP trained from scratch, on CPU, on the synthetic Shapes world (`compute/shapes/world.py`),",
        "so that clip-atlas has a real model to interpret offline and ground truth to check analyses against.",
        f"It is an ordinary open_clip `CLIP` built from `compute/model_configs/{arch}.json`: the",
        f"same towers, tokenizer and code paths as the public models. Load it with `--model {organism}`.",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | `{arch}` ({rec['parameters'] / 1e6:.1f} M parameters{_tower_line(rec)}) |",
        f"| loss | {rec.get('loss', 'softmax (CLIP)')} |",
        f"| trained by | `clip-atlas shapes train --arch {organism}"
        + (f" --threads {cfg['threads']}" if cfg.get("threads", 2) != 2 else "") + f"` (seed {cfg['seed']}) |",
        f"| steps x batch | {cfg['steps']} x {cfg['batch_size']} (groups of {cfg['group_size']}) |",
        f"| wall time | {rec['wall_minutes']:.0f} min on 2 CPU cores (shared with other work) |",
        f"| weights | `{weights.name}`, fp16 |",
        "",
        "## Held-out accuracy (1,000 one-object scenes never seen in training)",
        "Caption accuracy: the true caption must beat every caption that differs from it in that attribute alone.",
        "Zero-shot: a prompt naming the attribute alone (\"a red object\", \"an object in the top left\").",
        "",
        "| attribute | values | chance | caption accuracy | target | zero-shot |",
        "|---|---|---|---|---|---|",
    ]
    for attr, values in ATTRIBUTES.items():
        ok = "met" if cap[attr] >= targets[attr] else "**missed**"
        lines.append(f"| {attr} | {len(values)} | {1 / len(values):.2f} | {cap[attr]:.3f} | >= {targets[attr]} ({ok}) | {zs[attr]:.3f} |")
    lines += ["", "## Training curve (held-out caption accuracy, 300 scenes)", "",
              "| step | minutes | loss | " + " | ".join(ATTRIBUTES) + " |",
              "|---|---|---|" + "---|" * len(ATTRIBUTES)]
    for h in rec["history"]:
        lines.append(f"| {h['step']} | {h['minutes']:.0f} | {h['loss']:.3f} | " +
                     " | ".join(f"{h['caption'][a]:.2f}" for a in ATTRIBUTES) + " |")
    if rec.get("ground_truth"):
        lines += ["", f"## Heads (ground-truth evaluation of {rec.get('ground_truth_run', 'the demo run')}, "
                  "`clip-atlas shapes eval`; every stored layer)", ""]
        lines += [f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in rec["ground_truth"].items()]
    if rec.get("validation"):
        v = rec["validation"]
        lines += ["", f"## Validation on fresh seeds (`clip-atlas shapes validate`: seeds {', '.join(map(str, v['seeds']))}, "
                  f"{v['n']} scenes each, every step with the CLI's defaults)", "",
                  "| metric | mean | std | min |", "|---|---|---|---|"]
        lines += [f"| {k} | {x['mean']:.3f} | {x['std']:.3f} | {x['min']:.3f} |" for k, x in v["summary"].items()]
        lines += ["", "How the defaults were chosen (on other seeds) and what each figure means: docs/labels.md."]
    if rec.get("neurons"):
        lines += ["", "## MLP neurons against ground truth (`clip-atlas neurons`, then `clip-atlas shapes card --neurons RUN ...`)",
                  "", "Precision@8 of each neuron's top images (largest second-order effect) for the attribute value its",
                  "text description names, against chance. *Clear*: one value holds at least half the description's",
                  "weight; *first text*: the value of the first text picked. Details: docs/neurons.md.", "",
                  "| run | neurons | clear | p@8 | chance | first text | p@8 | chance | above chance |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rec["neurons"]:
            lines.append(f"| {r['run']} | {r['neurons']} | {r['clear_neurons']} | {r['clear_precision_at_8']:.3f} | "
                         f"{r['clear_chance']:.3f} | {r['first_text_neurons']} | {r['first_text_precision_at_8']:.3f} | "
                         f"{r['first_text_chance']:.3f} | {r['first_text_above_chance_share']:.0%} |")
    lines += ["", RECIPE_NOTES if organism == "shapes" else ZOO_NOTES]
    out = card_path(weights)
    out.write_text("\n".join(lines))
    return out
