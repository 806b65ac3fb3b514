"""Finding images in a folder tree and decoding them safely."""
from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from compute.csvfiles import read_csv_rows
from compute.errors import AtlasError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
#: Images with more pixels than this are refused before decoding (a 100 MP photo is fine).
MAX_PIXELS = 120_000_000
#: Longest side over shortest side beyond which an image is padded (`fit_aspect`).
MAX_ASPECT = 8.0
LABELS_FILE = "labels.csv"


class BadImage(Exception):
    """An image that cannot be used; the message is the reason, kept in the manifest."""


@dataclass(frozen=True)
class ImageRef:
    image_id: int
    path: str          # relative to the images root, POSIX separators
    label: str | None


def image_id(rel_path: str) -> int:
    """A stable 63-bit id from the relative path, so reruns and ranks agree without coordination."""
    return int.from_bytes(hashlib.blake2b(rel_path.encode(), digest_size=8).digest(), "big") >> 1


def read_labels(path: Path) -> dict[str, str]:
    """A CSV with columns path,label (path relative to the images root)."""
    return {r["path"]: r["label"] for r in read_csv_rows(path, ("path", "label"), "labels", allow_empty=True)}


def find_images(root: str | Path, labels_csv: str | Path | None = None, limit: int | None = None) -> list[ImageRef]:
    """Every image file under root in a stable order, labelled from its subfolder; or, with a labels CSV (given, or
    labels.csv in root), the image files the CSV lists, with its labels."""
    root = Path(root)
    if not root.is_dir():
        raise AtlasError(f"image folder not found: {root}")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise AtlasError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    csv_path = Path(labels_csv) if labels_csv else root / LABELS_FILE
    labels = read_labels(csv_path) if (labels_csv or csv_path.is_file()) else None
    if labels is not None:
        # a labels file defines the dataset: other image files in the tree (a Shapes folder's masks/) are not in it
        files = [f for f in files if f in labels]
        if not files:
            raise AtlasError(f"none of the images under {root} is listed in {csv_path} (its paths are relative to {root})")
    if limit is not None:
        files = files[:limit]
    refs = []
    for rel in files:
        if labels is not None:
            label = labels.get(rel)
        else:
            parts = rel.split("/")
            label = parts[-2] if len(parts) > 1 else None
        refs.append(ImageRef(image_id(rel), rel, label))
    return refs


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Decode to RGB or raise BadImage with a short reason; never decodes an oversized image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"too large ({w}x{h} pixels, limit {max_pixels})")
            if draft_size and img.format == "JPEG":
                # decode JPEGs at reduced scale when they are far larger than the model needs
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return fit_aspect(to_rgb8(img))
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage("not an image file, or a format Pillow cannot read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(type(e).__name__ if not str(e) else str(e).splitlines()[0][:200]) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"unreadable: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None


def to_rgb8(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel, scaled from the image's own bit depth: Pillow's convert() clips 16-bit and
    32-bit grey (modes I;16, I) at 255, which turns a 16-bit PNG white, and float images (mode F) too."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
        else:                      # 16-bit grey (PNG, TIFF): 0..65535; 32-bit integer grey beyond that
            top = 65535.0 if img.mode.startswith("I;16") or (a.size and a.max() > 255) else 255.0
            top = max(top, float(a.max()) if a.size else top)
        grey = np.clip(np.nan_to_num(a) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")


def fit_aspect(img: Image.Image, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """An image whose long side is at most `max_aspect` times its short side: more elongated ones (a 1 x 5000 strip)
    are padded on the short side with their mean colour, centred. CLIP's preprocessing scales the short side to
    the model's input size, which would make such a strip hundreds of thousands of pixels long."""
    w, h = img.size
    if max(w, h) <= max_aspect * min(w, h):
        return img
    short = math.ceil(max(w, h) / max_aspect)
    size = (w, short) if w > h else (short, h)
    mean = tuple(int(round(c)) for c in np.asarray(img, np.float32).reshape(-1, 3).mean(0))
    canvas = Image.new("RGB", size, mean)
    canvas.paste(img, ((size[0] - w) // 2, (size[1] - h) // 2))
    return canvas
