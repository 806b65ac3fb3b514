"""`clip-atlas eval segmentation`: the token decomposition as a zero-shot segmenter, against saliency baselines.

Data layout: images in any folder tree; a mask is the PNG at the same relative path and stem under the
masks folder (non-zero = foreground). An image's text is its class label (a `path,label` CSV whose paths
are relative to the CSV's folder, else the image's subfolder name) in a prompt template.

Each image and its mask go through the model's own geometry (resize the short side, centre crop); maps
are upsampled bilinearly from the patch grid to the model's input size and scored there
(`compute/maths/segmetrics.py` has the protocol).
"""
from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image
from tqdm import tqdm

from compute import checks
from compute.csvfiles import read_csv_rows
from compute.errors import AtlasError
from compute.images import BadImage, find_images, load_image, read_labels
from compute.maths.decompose import resolve_layers
from compute.maths.saliency import BASELINES, baseline_maps
from compute.maths.segmetrics import SegmentationScores
from compute.models import LoadedModel
from compute.store.layout import write_table_atomic
from compute.texts import fill_template, zero_shot_template

METHODS = ("decomposition",) + BASELINES
#: 'auto' picks the prompt a model was trained with: Shapes captions name the object bare, web CLIPs the photo.


@dataclass
class Example:
    image: Path
    mask: Path
    label: str | None


def class_texts(loaded: LoadedModel, classes: str) -> tuple[list[str], torch.Tensor]:
    """(class names, their text embeddings [C, D]) for predicting each image's class: 'imagenet' is open_clip's
    1,000 ImageNet class names, each the normalised mean of the 80 OpenAI prompt templates (the classifier the
    papers use); otherwise a label,prompt CSV."""
    if classes == "imagenet":
        names = list(IMAGENET_CLASSNAMES)
        k = len(OPENAI_IMAGENET_TEMPLATES)
        prompts = [t(c) for c in names for t in OPENAI_IMAGENET_TEMPLATES]
        emb = loaded.encode_texts(prompts, progress=True).view(len(names), k, -1).mean(1)
        return names, F.normalize(emb, dim=-1)
    rows = read_csv_rows(classes, ("label", "prompt"), "classes")
    return [r["label"] for r in rows], loaded.encode_texts([r["prompt"] for r in rows])


@dataclass
class Pairing:
    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)   # reason -> count


def check_methods(methods: tuple[str, ...]) -> None:
    bad = [m for m in methods if m not in METHODS] or ([] if methods else ["(none)"])
    if bad:
        raise AtlasError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")


def pair_examples(images: str | Path, masks: str | Path, labels: str | Path | None = None,
                  limit: int | None = None, need_labels: bool = True) -> Pairing:
    """Images with their masks and labels; images without a mask (or a label, when one is needed) are counted,
    not used."""
    checks.at_least(1, limit=limit)
    images, masks = Path(images), Path(masks)
    if not masks.is_dir():
        raise AtlasError(f"mask folder not found: {masks}")
    refs = find_images(images)
    by_csv = None
    if labels is not None:
        csv_path = Path(labels)
        if not csv_path.is_file():
            raise AtlasError(f"labels file not found: {csv_path}")
        by_csv = read_labels(csv_path)
        base = csv_path.resolve().parent
    out, skipped = [], {}
    for ref in refs:
        img = images / ref.path
        if by_csv is not None:
            try:
                label = by_csv.get(img.resolve().relative_to(base).as_posix())
            except ValueError:
                label = None
        else:
            label = ref.label
        mask = (masks / ref.path).with_suffix(".png")
        reason = "no label" if need_labels and not label else "no mask" if not mask.is_file() else None
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        out.append(Example(img, mask, label))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        detail = ", ".join(f"{v} {k}" for k, v in skipped.items()) or "nothing found"
        hint = "; pass --labels, or keep each class in its own subfolder" if labels is None and "no label" in skipped else ""
        raise AtlasError(f"no image under {images} has a mask{' and a label' if need_labels else ''} ({detail}){hint}")
    return Pairing(out, skipped)


def square_geometry(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the short side to `size` and centre-crop a square: open_clip's default eval geometry."""
    w, h = img.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    img = img.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_mask(path: Path, image_size: tuple[int, int], size: int) -> np.ndarray:
    """The mask as a boolean [size, size] array after the image's geometry, or BadImage."""
    try:
        with Image.open(path) as m:
            m.load()
            if m.size != image_size:
                raise BadImage(f"mask is {m.size[0]}x{m.size[1]}, its image {image_size[0]}x{image_size[1]}")
            m = m.convert("L")
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"unreadable mask: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
    return np.asarray(square_geometry(m, size, Image.Resampling.NEAREST)) > 0


def _upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0].cpu().numpy()


def decomposition_maps(loaded: LoadedModel, pixels: torch.Tensor, directions: torch.Tensor,
                       layers: list[int]) -> torch.Tensor:
    """Per patch, the direct contributions of the chosen layers' heads projected on each image's direction,
    clipped at zero: [B, gh, gw]."""
    uniq, inverse = torch.unique(directions, dim=0, return_inverse=True)
    d = loaded.decomposer(token_layers=tuple(layers))(pixels, token_directions=uniq.T)
    per_token = d.tokens[:, :, :, loaded.info.prefix_tokens:].sum((1, 2))     # [B, patches, K]
    scores = per_token.gather(2, inverse.view(-1, 1, 1).expand(-1, per_token.shape[1], 1))[..., 0]
    return scores.clamp(min=0).reshape(-1, *loaded.info.grid)


def evaluate_segmentation(loaded: LoadedModel, pairing: Pairing, methods: tuple[str, ...] = METHODS,
                          template: str | None = None, layers: str = "all", batch_size: int = 32,
                          classes: str | None = None, progress: bool = True,
                          per_image: list[dict] | None = None) -> tuple[list[dict], dict[str, int]]:
    """(one row per method: method, images, pixel_accuracy, miou, map, map_paper, seconds spent in its maps;
    skipped examples per reason). With `classes`, each image's text is the model's zero-shot prediction among
    them (ImageNet-Segmentation has no labels: the papers use the predicted class), else its label.
    A `per_image` list receives a row per image and method: path, text, method and that image's figures."""
    check_methods(methods)
    token_layers = resolve_layers(layers, loaded.info.layers)
    if classes is not None:
        labels, emb = class_texts(loaded, classes)
    else:
        labels = sorted({e.label for e in pairing.examples})
        emb = loaded.encode_texts(fill_template(template or zero_shot_template(loaded.info.architecture), labels))
    text_emb = dict(zip(labels, emb))
    # the decomposition map reads each token against its label's text minus the mean text of all labels, so what
    # every class shares does not light up the background (as the authors' code does), and clips at zero
    contrast = dict(zip(labels, emb - emb.mean(0, keepdim=True)))
    size = loaded.info.image_size[0]
    scores = {m: SegmentationScores() for m in methods}
    seconds = dict.fromkeys(methods, 0.0)
    skipped = dict(pairing.skipped)
    bar = tqdm(total=len(pairing.examples), desc="segment", unit="img", disable=not progress)
    for i in range(0, len(pairing.examples), batch_size):
        pix, masks, texts, paths = [], [], [], []
        for ex in pairing.examples[i:i + batch_size]:
            try:
                img = load_image(ex.image)
            except BadImage:
                skipped["bad image"] = skipped.get("bad image", 0) + 1
                continue
            try:
                masks.append(load_mask(ex.mask, img.size, size))
            except BadImage:
                skipped["bad mask"] = skipped.get("bad mask", 0) + 1
                continue
            pix.append(loaded.preprocess(img))
            texts.append(ex.label)
            paths.append(ex.image.as_posix())
        bar.update(min(batch_size, len(pairing.examples) - i))
        if not pix:
            continue
        pixels = torch.stack(pix).to(loaded.device)
        if classes is not None:
            with torch.no_grad():
                image_emb = F.normalize(loaded.model.encode_image(pixels).float(), dim=-1)
            texts = [labels[k] for k in (image_emb @ emb.T).argmax(1).tolist()]
        T = torch.stack([text_emb[t] for t in texts])
        dirs = [contrast[t] for t in texts]
        maps = {}
        if "decomposition" in methods:
            t0 = time.perf_counter()
            maps["decomposition"] = decomposition_maps(loaded, pixels, torch.stack(dirs), token_layers)
            seconds["decomposition"] += time.perf_counter() - t0
        base = tuple(m for m in methods if m != "decomposition")
        if base:
            t0 = time.perf_counter()
            maps.update(baseline_maps(loaded.tower, pixels, T, base))
            for m in base:   # one traced pass serves all baselines: its time is shared equally
                seconds[m] += (time.perf_counter() - t0) / len(base)
        for m, grid in maps.items():
            for heat, mask, path, text in zip(_upsample(grid, size), masks, paths, texts):
                figures = scores[m].add(heat, mask)
                if per_image is not None:
                    per_image.append({"path": path, "text": text, "method": m, **figures})
    bar.close()
    if not any(sc.images for sc in scores.values()):
        raise AtlasError("no image could be scored: " + ", ".join(f"{v} {k}" for k, v in sorted(skipped.items())))
    rows = [{"method": m, "images": scores[m].images, **scores[m].result(), "seconds": seconds[m]} for m in methods]
    return rows, skipped


def write_rows(rows: list[dict], out: str | Path) -> Path:
    """Parquet or CSV by the file's extension."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":

        write_table_atomic(pa.Table.from_pylist(rows), out)
    elif out.suffix == ".csv":
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        raise AtlasError(f"--out must end in .parquet or .csv, not {out.suffix or 'nothing'}")
    return out


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':14s} {'images':>6s} {'pixel acc':>9s} {'mIoU':>7s} {'mAP':>7s} {'mAP (paper)':>11s} {'seconds':>8s}"]
    lines += [f"{r['method']:14s} {r['images']:6d} {100 * r['pixel_accuracy']:9.2f} {100 * r['miou']:7.2f} "
              f"{100 * r['map']:7.2f} {100 * r['map_paper']:11.2f} {r['seconds']:8.1f}" for r in rows]
    return "\n".join(lines)
