"""Live work for the dashboard: the model loaded once per process, image decomposition, text embeddings."""
from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import streamlit as st
import torch
from PIL import Image

from compute.errors import AtlasError
from compute.images import BadImage, load_image
from compute.maths.segment import TokenMaps
from compute.models import LoadedModel, load_model

#: Uploads above this many pixels are refused (the store's compute job allows more; a page should stay quick).
MAX_UPLOAD_PIXELS = 40_000_000
#: An accepted image is downscaled once, at upload, so its long side is at most this: more than any model's input
#: (224-448 px) and the page's display need, so a 6000 x 6000 photo costs what a phone photo costs.
DISPLAY_SIDE = 1024


@st.cache_resource(show_spinner="Loading model ...")
def model(spec: str) -> LoadedModel:
    """One model per process and spec, on the GPU when there is one."""
    return load_model(spec, "cuda" if torch.cuda.is_available() else "cpu")


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded file as RGB, downscaled to DISPLAY_SIDE, or AtlasError with the reason in the app's own words."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            w, h = probe.size
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        w = h = 0
    if w * h > MAX_UPLOAD_PIXELS:
        limit = (f"{MAX_UPLOAD_PIXELS / 1e6:g} million" if MAX_UPLOAD_PIXELS >= 1_000_000
                 else f"{MAX_UPLOAD_PIXELS:,}")
        raise AtlasError(f"this image is too large: {w} x {h} pixels, and the dashboard takes up to {limit} pixels "
                         "(`clip-atlas compute` takes larger ones)")
    try:
        img = load_image(io.BytesIO(data), max_pixels=MAX_UPLOAD_PIXELS,
                         draft_size=DISPLAY_SIDE)
    except BadImage as e:
        raise AtlasError(f"this file is not a usable image: {e}") from None
    if max(img.size) > DISPLAY_SIDE:
        img.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.LANCZOS)
    return img


def image_key(image: Image.Image) -> str:
    return hashlib.blake2b(image.tobytes() + str(image.size).encode(), digest_size=16).hexdigest()


@st.cache_data(max_entries=64, show_spinner=False)
def text_embedding(spec: str, text: str) -> np.ndarray:
    return model(spec).encode_texts([text])[0].float().cpu().numpy()


@st.cache_data(max_entries=16, show_spinner=False, hash_funcs={Image.Image: image_key})
def image_token_maps(spec: str, image: Image.Image) -> TokenMaps:
    return model(spec).token_maps(image)
