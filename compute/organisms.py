"""The Shapes organisms trained here (`clip-atlas shapes train --arch NAME`): name -> open_clip architecture.

A plain table, imported by the CLI's parser (which must start fast) and by the model registry.
"""
from __future__ import annotations

ORGANISMS: dict[str, str] = {
    "shapes": "clip-atlas-shapes",
    "shapes-small": "clip-atlas-shapes-small",
    "shapes-deep": "clip-atlas-shapes-deep",
    "shapes-p16": "clip-atlas-shapes-p16",
    "shapes-siglip": "clip-atlas-shapes-map",
}

#: The organisms of the zoo: the base recipe on 15% of its scenes, so that only the architecture differs.
ZOO = ("shapes-small", "shapes-deep", "shapes-p16", "shapes-siglip")


def is_organism_architecture(architecture: str) -> bool:
    """True for the open_clip architecture of a Shapes organism: its texts are the Shapes pool and prompts."""
    return architecture in ORGANISMS.values()
