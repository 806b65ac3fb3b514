"""The project's own timm architectures: small towers for the Shapes organisms.

open_clip builds a timm tower from a registered timm model name, so an organism with
SigLIP's attention-pool ("MAP") head is a timm VisionTransformer registered here, at the
Shapes scale (64 px images, 8 px patches, width 128), and named in its open_clip config.
"""
from __future__ import annotations

import timm
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

SHAPES_SIGLIP = "vit_shapes_siglip"


def _shapes_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError(f"{SHAPES_SIGLIP} has no pretrained weights in timm")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory bookkeeping
        kwargs.pop(key, None)
    arch = dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=8, mlp_ratio=4.0,
                class_token=False, global_pool="map", act_layer="gelu_tanh")
    return VisionTransformer(**{**arch, **kwargs})


def register_timm_archs() -> None:
    """Idempotent: timm warns when a name is registered twice."""
    if not timm.is_model(SHAPES_SIGLIP):
        _shapes_siglip.__name__ = SHAPES_SIGLIP
        register_model(_shapes_siglip)
