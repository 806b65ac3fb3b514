"""Which adapter traces a model's vision tower (one per family), and why a tower is refused."""
from __future__ import annotations

import torch

from compute.errors import AtlasError
from compute.maths import tower_openclip, tower_timm
from compute.maths.trace import Tower

#: The families clip-atlas decomposes, and what "exact" means for each (README, `clip-atlas models`).
FAMILIES = {
    "open_clip ViT": "class-token or average pooling: LayerNorm scales frozen per image; sums to the embedding",
    "timm ViT": "SigLIP / SigLIP 2 (attention-pool head): norm scales, the pool's attention and its MLP gates "
                "frozen per image; sums to the embedding",
    "timm EVA": "EVA02 (class token; rotary embeddings, SwiGLU, sub-LN) and PE-Core (attention-pool head): "
                "norm scales (the sub-LN's too), pool attention and gates frozen; sums to the embedding",
}


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's vision tower cannot be traced and decomposed, or None."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return "the model has no vision tower"
    if tower_openclip.is_openclip_vit(visual):
        return tower_openclip.unsupported_reason(visual)
    if tower_timm.is_timm_tower(visual):
        return tower_timm.unsupported_reason(visual)
    kind = type(visual).__name__
    why = {"ModifiedResNet": "a ResNet tower (attention pooling over conv features)"}
    return (f"its vision tower is {why.get(kind, kind)}; open_clip ViTs and timm ViT/EVA towers decompose "
            "(ConvNeXt, ResNet, FastViT/MobileCLIP do not: their features are not a sum of token writes)")


def tower(model: torch.nn.Module) -> Tower:
    """The adapter for the model's vision tower, or AtlasError saying why there is none."""
    reason = unsupported_reason(model)
    if reason:
        raise AtlasError(f"cannot decompose: {reason}")
    if tower_openclip.is_openclip_vit(model.visual):
        return tower_openclip.OpenClipViT(model)
    return tower_timm.TimmTower(model)
