"""Contrastive training of the Shapes CLIP on CPU, with hard-negative groups.

Each batch is made of groups of scenes that share everything but one attribute
(a different one for each member), so every attribute is needed to tell the
captions of a group apart. Without this, the contrastive task is solved by the
salient attributes alone (colour, background) and shape and position are never
learned.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from compute.maths.towers import tower
from compute.models import register_configs
from compute.organisms import ORGANISMS
from compute.shapes.accuracy import CAPTION_TARGETS, attribute_accuracy, to_model_input
from compute.shapes.card import write_card
from compute.shapes.world import ATTRIBUTES, POSITIONS, Renderer, Scene, WorldSpec, caption

@dataclass
class TrainConfig:
    arch: str = "shapes"  # an organism of compute.models.ORGANISMS
    steps: int = 2000
    batch_size: int = 256
    group_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    seed: int = 0
    threads: int = 2
    eval_every: int = 400
    eval_scenes: int = 300
    # how often each attribute is the one varied inside a group
    vary_weights: dict[str, float] = field(default_factory=lambda: {
        "color": 1.0, "background": 1.0, "size": 1.0, "shape": 2.0, "pattern": 2.0, "position": 2.0})


def sample_group(spec: WorldSpec, rng: random.Random, size: int, vary: dict[str, float]) -> list[Scene]:
    """A base scene and variants of it, each differing from it in one attribute."""
    base = spec.sample(rng)
    group, seen = [base], {base}
    attrs, weights = list(vary), list(vary.values())
    while len(group) < size:
        attr = rng.choices(attrs, weights)[0]
        obj = rng.randrange(len(base.objects))
        current = base.get(attr, obj)
        taken = {o.position for o in base.objects} if attr == "position" else {current}
        choices = [v for v in ATTRIBUTES[attr] if v not in taken and v != current]
        if attr == "position" and not choices:
            choices = [p for p in POSITIONS if p != current]
        scene = base.replace(attr, rng.choice(choices), obj)
        if scene not in seen:
            seen.add(scene)
            group.append(scene)
    return group


class BatchMaker:
    def __init__(self, cfg: TrainConfig, tokenizer, mean, std):
        self.cfg, self.tokenizer, self.mean, self.std = cfg, tokenizer, mean, std
        self.rng = random.Random(cfg.seed)
        self.renderer = Renderer(cfg.seed)
        self.spec = WorldSpec()
        self._tok_cache: dict[str, torch.Tensor] = {}

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in texts if t not in self._tok_cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self._tok_cache[t] = row
        return torch.stack([self._tok_cache[t] for t in texts])

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        scenes = [s for _ in range(c.batch_size // c.group_size)
                  for s in sample_group(self.spec, self.rng, c.group_size, c.vary_weights)]
        imgs = np.stack([self.renderer.render(s, self.rng)[0] for s in scenes])
        texts = [caption(s, self.rng, full=True) for s in scenes]
        return to_model_input(imgs, self.mean, self.std, "cpu"), self._tokens(texts)


#: The zoo's recipe: the base recipe on 15% of its scenes (600 x 128 against 2000 x 256), what two CPU cores
#: train in 10-30 minutes; the organisms of the zoo share it, so size, patch and pool are what differ between them.
ZOO_RECIPE = dict(steps=600, batch_size=128, eval_every=200)


def recipe(arch: str, **overrides) -> TrainConfig:
    """The recipe an organism was trained with (the base Shapes CLIP: the long one; the zoo: ZOO_RECIPE)."""
    base = {} if arch == "shapes" else ZOO_RECIPE
    return TrainConfig(arch=arch, **{**base, **overrides})


def build_model(arch: str = "shapes"):
    register_configs()
    model = open_clip.create_model(ORGANISMS[arch], pretrained=None)
    return model, open_clip.get_tokenizer(ORGANISMS[arch])


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))


def clip_loss(model, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The model's own objective: CLIP's softmax over the batch both ways, or, where the model has a logit bias
    (SigLIP), the sigmoid loss: every image-text pair an independent binary match, +1 on the diagonal."""
    img = F.normalize(model.encode_image(images), dim=-1)
    txt = F.normalize(model.encode_text(tokens), dim=-1)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    if getattr(model, "logit_bias", None) is not None:
        signs = 2 * torch.eye(len(img)) - 1
        return -F.logsigmoid(signs * (logits + model.logit_bias)).sum() / len(img)
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def save_weights(model, path: Path) -> None:
    """fp16 safetensors (the card's figures are measured on these rounded weights)."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def fit(model, cfg: TrainConfig, batches: Callable[[], tuple[torch.Tensor, torch.Tensor]], desc: str = "train",
        checkpoint: Callable[[int, float], None] | None = None) -> None:
    """The one training loop: AdamW with warmup and cosine decay, the symmetric CLIP loss, gradient clipping at 1.
    `batches()` gives (images, tokens); `checkpoint(step, loss)` runs every cfg.eval_every steps and at the end."""
    opt = make_optimizer(model, cfg)
    model.train()
    bar = tqdm(range(cfg.steps), desc=desc, unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        images, tokens = batches()
        loss = clip_loss(model, images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            checkpoint(step + 1, loss.item())


def describe_tower(model) -> str:
    """'6 layers x 8 heads, width 128, patch 8, class token', from the tower adapter every job uses."""
    t = tower(model)
    pool = {"map": "attention pool", "tok": "class token", "avg": "average pool"}[t.pool_type]
    return (f"{t.n_layers} layers x {t.n_heads} heads, width {t.width}, patch {t.image_size[0] // t.grid[0]}, "
            f"{pool}")


def train(cfg: TrainConfig, out: Path, log=print) -> dict:
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model, tokenizer = build_model(cfg.arch)
    pcfg = model.visual.preprocess_cfg
    batches = BatchMaker(cfg, tokenizer, pcfg["mean"], pcfg["std"])
    history, t0 = [], time.time()

    def checkpoint(step: int, loss: float) -> None:
        acc = attribute_accuracy(model, tokenizer, n=cfg.eval_scenes, seed=999)
        entry = {"step": step, "loss": loss, "minutes": (time.time() - t0) / 60, **acc}
        history.append(entry)
        log(json.dumps(entry))
        save_weights(model, out)

    fit(model, cfg, batches, "train", checkpoint)
    wall = time.time() - t0
    # final figures on the rounded weights, as they will be loaded
    model.load_state_dict({k: v.float() for k, v in load_file(str(out)).items()})
    final = attribute_accuracy(model, tokenizer, n=1000, seed=12345)
    card = {"model": ORGANISMS[cfg.arch], "organism": cfg.arch, "config": asdict(cfg), "wall_minutes": wall / 60,
            "tower": describe_tower(model), "loss": "sigmoid (SigLIP)" if model.logit_bias is not None else "softmax (CLIP)",
            "heldout": final, "targets": CAPTION_TARGETS, "history": history,
            "parameters": sum(p.numel() for p in model.parameters())}
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    write_card(out)
    log(json.dumps({"final": final, "wall_minutes": wall / 60}))
    return card
