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
of as many heads from the same layers.
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
from tqdm import tqdm

from .world import OBJECT_ATTRIBUTES, Renderer, Scene, Tie, WorldSpec, describe

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
class SpuriousConfig:
    steps: int = 300
    batch_size: int = 256
    group_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    threads: int = 2
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
    from safetensors.torch import load_file

    from ..models import SHAPES_WEIGHTS
    from .accuracy import attribute_accuracy, to_model_input
    from .train import build_model, clip_loss, lr_at, make_optimizer, sample_group, save_weights
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model()
    base_weights = base_weights or SHAPES_WEIGHTS
    model.load_state_dict({k: v.float() for k, v in load_file(str(base_weights)).items()})
    pcfg = model.visual.preprocess_cfg
    spec, rng, renderer = spurious_world(cfg.tie), random.Random(cfg.seed), Renderer(cfg.seed)
    opt = make_optimizer(model, cfg)  # type: ignore[arg-type]
    model.train()
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="fine-tune", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)  # type: ignore[arg-type]
        scenes = [s for _ in range(cfg.batch_size // cfg.group_size)
                  for s in sample_group(spec, rng, cfg.group_size, cfg.vary_weights)]
        imgs = np.stack([renderer.render(s, rng)[0] for s in scenes])
        tokens = tokenizer([spurious_caption(s, rng, cfg.background_in_caption) for s in scenes])
        loss = clip_loss(model, to_model_input(imgs, pcfg["mean"], pcfg["std"], "cpu"), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    save_weights(model, out)
    model.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    record = {"model": SPURIOUS_NAME, "base": base_weights.name, "config": asdict(cfg),
              "wall_minutes": (time.time() - t0) / 60,
              "heldout": attribute_accuracy(model, tokenizer, n=1000, seed=12345),
              "parameters": sum(p.numel() for p in model.parameters())}
    out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    log(json.dumps({"heldout": record["heldout"], "wall_minutes": record["wall_minutes"]}))
    return record
