"""Held-out accuracy of a CLIP on the Shapes world, per attribute.

Two measures:
- caption accuracy: the true caption must beat every caption that differs from it
  in that one attribute (chance is 1 / number of values);
- zero-shot accuracy: a prompt naming the attribute alone ("a red object"),
  argmax over the attribute's values.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from compute.shapes.world import ATTRIBUTES, Renderer, Scene, WorldSpec, attribute_prompt, canonical_caption


def heldout_scenes(n: int, seed: int) -> list[Scene]:
    """One-object scenes from the independent world (one object keeps every attribute unambiguous)."""
    spec = WorldSpec(two_object_prob=0.0)
    rng = random.Random(seed)
    return [spec.sample(rng) for _ in range(n)]


def to_model_input(images: np.ndarray, mean, std, device) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> normalised float [B, 3, H, W], identical to open_clip's preprocess at native size."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], device, batch: int = 1024) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        tok = tokenizer(texts[i:i + batch]).to(device)
        out.append(torch.nn.functional.normalize(model.encode_text(tok).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def encode_scenes(model, scenes: list[Scene], seed: int, device, batch: int = 256) -> torch.Tensor:
    renderer = Renderer(seed)
    rng = random.Random(seed)
    cfg = model.visual.preprocess_cfg
    out = []
    for i in range(0, len(scenes), batch):
        imgs = np.stack([renderer.render(s, rng)[0] for s in scenes[i:i + batch]])
        x = to_model_input(imgs, cfg["mean"], cfg["std"], device)
        out.append(torch.nn.functional.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def attribute_accuracy(model, tokenizer, n: int = 500, seed: int = 12345, device="cpu") -> dict[str, dict[str, float]]:
    """{'caption': {attr: acc}, 'zero_shot': {attr: acc}} on n held-out one-object scenes."""
    was_training = model.training
    model.eval()
    scenes = heldout_scenes(n, seed)
    img = encode_scenes(model, scenes, seed, device)
    result: dict[str, dict[str, float]] = {"caption": {}, "zero_shot": {}}
    for attr, values in ATTRIBUTES.items():
        texts = [canonical_caption(s.replace(attr, v)) for s in scenes for v in values]
        txt = encode_texts(model, tokenizer, texts, device).view(n, len(values), -1)
        pred = torch.einsum("nd,nvd->nv", img, txt).argmax(1)
        truth = torch.tensor([values.index(s.get(attr)) for s in scenes], device=pred.device)
        result["caption"][attr] = (pred == truth).float().mean().item()
        prompts = encode_texts(model, tokenizer, [attribute_prompt(attr, v) for v in values], device)
        zs = (img @ prompts.T).argmax(1)
        result["zero_shot"][attr] = (zs == truth).float().mean().item()
    model.train(was_training)
    return result


CAPTION_TARGETS = {"color": 0.95, "background": 0.95, "size": 0.85, "shape": 0.85, "pattern": 0.85, "position": 0.6}
