"""`clip-atlas shapes generate`: a folder of Shapes scenes with labels, attributes and masks.

    DIR/images/NNNNNN.png
    DIR/labels.csv        path,label   (label: '<colour> <shape>' of the first object; picked up by compute)
    DIR/objects.csv       path,label   (label: every object named as the training captions name it, without the
                                        background: 'large red striped circle in the top left'; the text for
                                        `clip-atlas eval segmentation --labels`, see docs/reproduce.md)
    DIR/scenes.parquet    path, caption, background, n_objects, obj{1,2}_{color,shape,pattern,size,position}
    DIR/masks/NNNNNN.png  the same mask as an 8-bit PNG per image (non-zero = foreground), the layout
                          `clip-atlas eval segmentation --masks` reads
    DIR/masks.npy         uint8 [N, S, S]: 0 background, 1 first object, 2 second object (row = scenes order)
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from compute import checks
from compute.errors import AtlasError
from compute.shapes.world import Renderer, WorldSpec, caption, objects_phrase, scene_record


def generate(n: int, seed: int, out: str | Path, spec: WorldSpec | None = None, progress: bool = True) -> Path:
    checks.at_least(1, n=n)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    spec = spec or WorldSpec()
    rng = random.Random(seed)
    renderer = Renderer(seed)
    records, masks, labels, objects = [], np.zeros((n, 64, 64), np.uint8), [], []
    for i in tqdm(range(n), desc="generate", unit="scene", disable=not progress):
        scene = spec.sample(rng)
        img, mask = renderer.render(scene, rng)
        rel = f"images/{i:06d}.png"
        Image.fromarray(img).save(out / rel, optimize=False, compress_level=1)
        masks[i] = mask
        Image.fromarray(mask).save(out / "masks" / f"{i:06d}.png", optimize=False, compress_level=1)
        rec = {"path": rel, "caption": caption(scene, rng, full=rng.random() < 0.5), **scene_record(scene)}
        records.append(rec)
        labels.append((rel, f"{scene.objects[0].color} {scene.objects[0].shape}"))
        objects.append((rel, objects_phrase(scene)))
    pq.write_table(pa.Table.from_pylist(records), out / "scenes.parquet")
    np.save(out / "masks.npy", masks)
    for name, rows in (("labels.csv", labels), ("objects.csv", objects)):
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows(rows)
    return out


def load_scenes(folder: str | Path) -> tuple[list[dict], np.ndarray]:
    folder = Path(folder)
    try:
        scenes = pq.read_table(folder / "scenes.parquet").to_pylist()
        masks = np.load(folder / "masks.npy", mmap_mode="r")     # read per image: memory does not grow with N
    except (OSError, ValueError) as e:
        raise AtlasError(f"{folder} is not a Shapes dataset (scenes.parquet, masks.npy): {e}") from None
    return scenes, masks
