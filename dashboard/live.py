"""Live work for the dashboard: the model loaded once per process, image decomposition, text embeddings."""
from __future__ import annotations

import hashlib
import io

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


@st.cache_resource(show_spinner="Loading model ...")
def model(spec: str) -> LoadedModel:
    """One model per process and spec, on the GPU when there is one."""
    return load_model(spec, "cuda" if torch.cuda.is_available() else "cpu")


def decode_upload(data: bytes) -> Image.Image:
    """An uploaded file as RGB, or AtlasError with the reason."""
    try:
        return load_image(io.BytesIO(data), max_pixels=MAX_UPLOAD_PIXELS)
    except BadImage as e:
        raise AtlasError(f"this file is not a usable image: {e}") from None


def image_key(image: Image.Image) -> str:
    return hashlib.blake2b(image.tobytes() + str(image.size).encode(), digest_size=16).hexdigest()


@st.cache_data(max_entries=64, show_spinner=False)
def text_embedding(spec: str, text: str) -> np.ndarray:
    return model(spec).encode_texts([text])[0].float().cpu().numpy()


@st.cache_data(max_entries=16, show_spinner=False, hash_funcs={Image.Image: image_key})
def image_token_maps(spec: str, image: Image.Image) -> TokenMaps:
    return model(spec).token_maps(image)
