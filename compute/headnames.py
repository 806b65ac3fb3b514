"""One spelling of a head: `L5.H3` (layer 5, head 3, both from 0) in text, tables, downloads and URLs.

`parse_head` also reads the spellings older URLs and commands used (`5.3`, `5,3`, `L5H3`, `L5 H3`), so links
made before keep working; what it writes is always `head_name`.
"""
from __future__ import annotations

import re

from compute.errors import AtlasError

_HEAD = re.compile(r"^\s*L?(-?\d+)\s*(?:[.,]\s*H?|\s*H|\s+)(\d+)\s*$", re.IGNORECASE)


def head_name(layer: int, head: int) -> str:
    return f"L{int(layer)}.H{int(head)}"


def parse_head(text: str, n_layers: int | None = None, n_heads: int | None = None) -> tuple[int, int]:
    """'L5.H3' (or an older spelling) -> (5, 3). A negative layer counts from the end when n_layers is given;
    with the model's size, a head outside it is an AtlasError."""
    m = _HEAD.match(text or "")
    if not m:
        raise AtlasError(f"bad head {text.strip()!r}: write heads as LAYER.HEAD, e.g. L10.H3 or 10.3")
    layer, head = int(m.group(1)), int(m.group(2))
    if n_layers is not None:
        if layer < 0:
            layer += n_layers
        if not (0 <= layer < n_layers and (n_heads is None or 0 <= head < n_heads)):
            raise AtlasError(f"head {text.strip()} is outside a model with {n_layers} layers of {n_heads} heads")
    elif layer < 0:
        raise AtlasError(f"bad head {text.strip()!r}: a negative layer needs the model's depth")
    return layer, head


def parse_heads(spec: str, n_layers: int | None = None, n_heads: int | None = None) -> list[tuple[int, int]]:
    """'L10.H3,L11.H7' (comma-separated, older spellings read too) -> sorted unique (layer, head) pairs."""
    items = [x for x in (spec or "").split(",") if x.strip()]
    if not items:
        raise AtlasError("no heads given: write heads as LAYER.HEAD, e.g. L10.H3,L11.H7")
    return sorted({parse_head(x, n_layers, n_heads) for x in items})
