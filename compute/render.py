"""Display: heatmaps as colours over images, on one shared scale (the dashboard and the HTML report draw with it)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from compute.maths.segment import upsample


def colormap(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB in [0, 1]: a perceptually ordered blue-white-red ramp (computed in float: no uint8 wrap-around)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    blue, white, red = np.array([0.23, 0.30, 0.75]), np.array([0.97, 0.97, 0.97]), np.array([0.71, 0.02, 0.15])
    lo = blue + (white - blue) * (x / 0.5)
    hi = white + (red - white) * ((x - 0.5) / 0.5)
    return np.where(x < 0.5, lo, hi)


def overlay(image: Image.Image, heat: np.ndarray, vmin: float, vmax: float, alpha: float = 0.55) -> Image.Image:
    """The heatmap (already at image size or not) over the image, scaled to [vmin, vmax]."""
    rgb = np.asarray(image.convert("RGB"), np.float32) / 255.0
    if heat.shape != rgb.shape[:2]:
        heat = upsample(heat, rgb.shape[:2])
    span = vmax - vmin if vmax > vmin else 1.0
    colour = colormap((heat - vmin) / span)
    out = (1 - alpha) * rgb + alpha * colour
    return Image.fromarray(np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8))


def symmetric_range(*maps: np.ndarray) -> tuple[float, float]:
    """One colour scale for several maps, centred on zero."""
    m = max(float(np.abs(x).max()) for x in maps) if maps else 1.0
    m = m or 1.0
    return -m, m
