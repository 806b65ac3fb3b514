"""The Shapes world: seeded synthetic scenes whose causes are known.

A scene is a textured background with one or two objects. Every object has a
shape, colour, pattern, size and a position on a 3x3 grid. The renderer returns
the image, a per-pixel object-index mask and a structured record, so every
analysis can be checked against ground truth.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 230, 40),
    "green": (40, 200, 60),
    "cyan": (40, 220, 230),
    "blue": (40, 70, 230),
    "purple": (150, 50, 210),
    "pink": (250, 130, 200),
}
PATTERNS = ("solid", "striped", "dotted")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
BACKGROUNDS = ("grass", "water", "sand", "snow", "brick", "night sky")

#: attribute name -> its values; the order is the world's vocabulary order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "pattern": PATTERNS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
OBJECT_ATTRIBUTES = ("color", "shape", "pattern", "size", "position")

_RADIUS = {"small": 7.5, "large": 12.5}
_CELL = IMAGE_SIZE / 3


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    pattern: str
    size: str
    position: str

    def get(self, attr: str) -> str:
        return getattr(self, attr)


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def get(self, attr: str, obj: int = 0) -> str:
        return self.background if attr == "background" else self.objects[obj].get(attr)

    def replace(self, attr: str, value: str, obj: int = 0) -> Scene:
        """The same scene with one attribute changed."""
        if attr == "background":
            return dataclasses.replace(self, background=value)
        objs = list(self.objects)
        objs[obj] = dataclasses.replace(objs[obj], **{attr: value})
        return dataclasses.replace(self, objects=tuple(objs))


@dataclass(frozen=True)
class Tie:
    """When `if_attr` is `if_value`, set `then_attr` to `then_value` with probability `prob`."""
    if_attr: str
    if_value: str
    then_attr: str
    then_value: str
    prob: float


@dataclass
class WorldSpec:
    """The attribute distribution: independent uniform by default, with optional ties."""
    two_object_prob: float = 0.2
    weights: dict[str, dict[str, float]] = field(default_factory=dict)
    ties: tuple[Tie, ...] = ()

    def sample_value(self, rng: random.Random, attr: str) -> str:
        values = ATTRIBUTES[attr]
        w = self.weights.get(attr)
        if not w:
            return rng.choice(values)
        return rng.choices(values, weights=[w.get(v, 0.0) for v in values])[0]

    def sample(self, rng: random.Random) -> Scene:
        n = 2 if rng.random() < self.two_object_prob else 1
        positions = rng.sample(POSITIONS, n) if "position" not in self.weights else None
        objs = []
        for i in range(n):
            rec = {a: self.sample_value(rng, a) for a in OBJECT_ATTRIBUTES}
            if positions:
                rec["position"] = positions[i]
            objs.append(Obj(**rec))
        scene = Scene(self.sample_value(rng, "background"), tuple(objs))
        for tie in self.ties:
            if scene.get(tie.if_attr) == tie.if_value and rng.random() < tie.prob:
                scene = scene.replace(tie.then_attr, tie.then_value)
        return scene


# ---------------------------------------------------------------- textures

def _noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Smooth value noise in [0, 1]: coarse random grid, bilinearly upsampled."""
    n = size // scale + 2
    g = rng.random((n, n))
    idx = np.arange(size) / scale
    i0 = idx.astype(int)
    f = idx - i0
    rows = g[i0] * (1 - f)[:, None] + g[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _make_texture(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fine = rng.random((size, size)).astype(np.float32)
    coarse = _noise(rng, size, 16).astype(np.float32)
    if kind == "grass":
        blades = np.sin(xx * 1.7 + 3 * coarse) * 0.5 + 0.5
        v = 0.55 + 0.25 * blades * fine + 0.2 * coarse
        rgb = np.stack([0.25 * v, 0.62 * v, 0.18 * v], -1)
    elif kind == "water":
        waves = np.sin(yy * 0.9 + 2.5 * np.sin(xx * 0.25) + 4 * coarse) * 0.5 + 0.5
        rgb = np.stack([0.10 + 0.10 * waves, 0.30 + 0.20 * waves, 0.55 + 0.25 * waves], -1)
    elif kind == "sand":
        v = 0.80 + 0.12 * fine + 0.08 * coarse
        rgb = np.stack([0.93 * v, 0.80 * v, 0.55 * v], -1)
    elif kind == "snow":
        v = 0.86 + 0.08 * coarse + 0.06 * (fine > 0.93)
        rgb = np.stack([0.92 * v, 0.95 * v, 1.0 * v], -1)
    elif kind == "brick":
        row = (yy // 6).astype(int)
        shifted = xx + (row % 2) * 6
        mortar = ((yy % 6) < 1) | ((shifted % 12) < 1)
        v = 0.75 + 0.25 * fine * 0.6 + 0.15 * coarse
        brick = np.stack([0.62 * v, 0.25 * v, 0.18 * v], -1)
        rgb = np.where(mortar[..., None], np.float32(0.78), brick)
    elif kind == "night sky":
        stars = (fine > 0.985).astype(np.float32)
        rgb = np.stack([0.03 + 0.05 * coarse, 0.04 + 0.05 * coarse, 0.14 + 0.10 * coarse], -1)
        rgb = rgb + stars[..., None] * 0.85
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(rgb * 255, 0, 255).astype(np.uint8)


class TextureBank:
    """A few large tiles per background; a scene crops one at a random offset."""

    def __init__(self, seed: int = 0, variants: int = 4, tile: int = 2 * IMAGE_SIZE):
        rng = np.random.default_rng(seed)
        self.tile = tile
        self.tiles = {k: [_make_texture(k, rng, tile) for _ in range(variants)] for k in BACKGROUNDS}

    def crop(self, kind: str, rng: random.Random) -> np.ndarray:
        t = rng.choice(self.tiles[kind])
        y, x = rng.randrange(self.tile - IMAGE_SIZE), rng.randrange(self.tile - IMAGE_SIZE)
        return t[y:y + IMAGE_SIZE, x:x + IMAGE_SIZE].copy()


# ---------------------------------------------------------------- objects

_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32) + 0.5


def _shape_mask(shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = _YY - cy, _XX - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        s = r * 0.85
        return (np.abs(dy) <= s) & (np.abs(dx) <= s)
    if shape == "triangle":
        # apex up; base at cy + 0.8r; sides through the apex at cy - r
        top, base = cy - r, cy + 0.8 * r
        half = (dy + r) / (1.8 * r) * r
        return (_YY >= top) & (_YY <= base) & (np.abs(dx) <= half)
    if shape == "cross":
        w = r * 0.38
        return ((np.abs(dy) <= w) & (np.abs(dx) <= r)) | ((np.abs(dx) <= w) & (np.abs(dy) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, size: str) -> np.ndarray | None:
    """Pixels drawn in the darker shade of the object's colour."""
    period = 4.0 if size == "small" else 6.0
    if pattern == "solid":
        return None
    if pattern == "striped":
        return ((_YY + _XX) % period) < period / 2
    if pattern == "dotted":
        py, px = _YY % period - period / 2, _XX % period - period / 2
        return py * py + px * px <= (period * 0.28) ** 2
    raise ValueError(f"unknown pattern {pattern!r}")


def position_center(position: str) -> tuple[float, float]:
    i = POSITIONS.index(position)
    return (i // 3 + 0.5) * _CELL, (i % 3 + 0.5) * _CELL


class Renderer:
    def __init__(self, seed: int = 0):
        self.bank = TextureBank(seed)

    def render(self, scene: Scene, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """(image uint8 [S, S, 3], mask uint8 [S, S]: 0 background, i+1 object i)."""
        img = self.bank.crop(scene.background, rng).astype(np.float32)
        mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        for i, obj in enumerate(scene.objects):
            cy, cx = position_center(obj.position)
            cy += rng.uniform(-2, 2)
            cx += rng.uniform(-2, 2)
            r = _RADIUS[obj.size] * rng.uniform(0.92, 1.08)
            inside = _shape_mask(obj.shape, cy, cx, r)
            outline = _shape_mask(obj.shape, cy, cx, r + 1.3) & ~inside
            base = np.array(COLORS[obj.color], np.float32) * rng.uniform(0.9, 1.05)
            img[outline] = 20.0
            img[inside] = base
            pm = _pattern_mask(obj.pattern, obj.size)
            if pm is not None:
                img[inside & pm] = base * 0.35
            mask[inside | outline] = i + 1
        return np.clip(img, 0, 255).astype(np.uint8), mask


# ---------------------------------------------------------------- captions

def describe(obj: Obj, rng: random.Random | None, keep: tuple[str, ...] = OBJECT_ATTRIBUTES) -> str:
    """A noun phrase for one object naming the attributes in `keep`."""
    words = [obj.size if "size" in keep else None, obj.color if "color" in keep else None,
             obj.pattern if "pattern" in keep else None, obj.shape if "shape" in keep else "object"]
    phrase = " ".join(w for w in words if w)
    if "position" in keep:
        prep = "in the" if rng is None or rng.random() < 0.5 else "at the"
        phrase = f"{phrase} {prep} {obj.position}"
    return phrase


_TEMPLATES = (
    "a {objs} on {bg}",
    "{objs} on a {bg} background",
    "on {bg}, {objs}",
    "a picture of {objs} over {bg}",
    "{bg} with {objs}",
)


def caption(scene: Scene, rng: random.Random, full: bool = True) -> str:
    """A caption of the scene; `full` names every attribute, otherwise a random subset."""
    phrases = []
    for obj in scene.objects:
        keep = OBJECT_ATTRIBUTES if full else tuple(a for a in OBJECT_ATTRIBUTES if rng.random() < 0.6)
        phrases.append(describe(obj, rng, keep))
    objs = " and a ".join(phrases)
    tpl = rng.choice(_TEMPLATES)
    text = tpl.format(objs=objs, bg=scene.background)
    return text.replace("a a ", "a ").strip()


def objects_phrase(scene: Scene) -> str:
    """The scene's objects named as the training captions name them ('large red striped circle in the top left'),
    without the background: the text of what a Shapes mask covers."""
    return " and a ".join(describe(o, None) for o in scene.objects)


def canonical_caption(scene: Scene) -> str:
    """One fixed caption naming every attribute (used for evaluation)."""
    return f"a {objects_phrase(scene)} on {scene.background}"


def attribute_prompt(attr: str, value: str) -> str:
    """A prompt naming one attribute alone, for zero-shot classification."""
    return {
        "color": f"a {value} object",
        "shape": f"a {value}",
        "pattern": f"a {value} object",
        "size": f"a {value} object",
        "position": f"an object in the {value}",
        "background": f"a scene on {value}",
    }[attr]


def scene_record(scene: Scene) -> dict:
    """Flat attribute columns: background, n_objects, obj{1,2}_{attr}."""
    rec: dict = {"background": scene.background, "n_objects": len(scene.objects)}
    for i in range(2):
        for a in OBJECT_ATTRIBUTES:
            rec[f"obj{i + 1}_{a}"] = scene.objects[i].get(a) if i < len(scene.objects) else None
    return rec
