"""The decomposition sums back to encode_image, on every supported kind of ViT."""
from __future__ import annotations

import pytest
import torch

from compute.errors import AtlasError
from compute.maths.decompose import Decomposer, resolve_layers
from compute.maths.towers import unsupported_reason

from .conftest import random_model

MODELS = [
    "ViT-B-32",             # the reference architecture
    "ViT-B-32-quickgelu",   # QuickGELU
    "ViT-M-16-alt",         # LayerScale
    "clip-atlas-shapes",    # the project's own config
    "tiny-avg-ls",          # average pooling (ln before pool), LayerScale, quick_gelu
    "tiny-avg-lnafter",     # average pooling with the final LayerNorm after pooling
]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def check_invariants(model, dtype, batch: int = 2) -> None:
    layers = len(model.visual.transformer.resblocks)
    head_layers = resolve_layers("last2", layers)
    dec = Decomposer(model, head_layers=head_layers, token_layers=[layers - 1])
    size = model.visual.image_size[0]
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
    d = dec(images)
    tol = TOL[dtype]
    assert (d.embedding - ref).abs().max() <= tol                     # our forward is the model's
    assert (d.total() - ref).abs().max() <= tol                       # components sum to the embedding
    assert (d.heads.sum(2) - d.attn[:, head_layers]).abs().max() <= tol   # heads sum to the layer
    assert (d.tokens.sum(3)[:, 0] - d.heads[:, -1]).abs().max() <= tol    # tokens sum to the head
    # the parts are not trivially zero: every kind carries weight
    for part in (d.embed, d.attn, d.attn_bias, d.mlp, d.ln_bias, d.heads):
        assert part.abs().max() > 1e-6


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sum_invariants(name, dtype):
    check_invariants(random_model(name, dtype), dtype)


def test_token_maps_never_build_query_dimension():
    model = random_model("ViT-B-32")
    dec = Decomposer(model, token_layers=[11])
    d = dec(torch.randn(1, 3, 224, 224))
    assert d.tokens.shape == (1, 1, 12, 50, 512)


def test_heads_are_exact_when_biases_matter():
    """A decomposition that dropped the out-projection bias would still sum heads correctly; the total would not."""
    model = random_model("clip-atlas-shapes")
    d = Decomposer(model, head_layers=[5])(torch.randn(2, 3, 64, 64))
    assert (d.total() - d.embedding).abs().max() < 1e-4
    assert (d.total() - d.attn_bias.sum(1) - d.embedding).abs().max() > 1e-3


@pytest.mark.parametrize("name,why", [
    ("RN50", "ResNet"),
    ("coca_ViT-B-32", "attentional pooler"),
    ("tiny-qknorm", "custom attention"),
])
def test_unsupported_architectures_are_refused(name, why):
    import open_clip
    model = open_clip.create_model(name, pretrained=None)
    assert why in unsupported_reason(model)
    with pytest.raises(AtlasError, match=why):
        Decomposer(model)


def test_resolve_layers():
    assert resolve_layers("last4", 12) == [8, 9, 10, 11]
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers("-1,0", 12) == [0, 11]
    assert resolve_layers("none", 12) == []
    with pytest.raises(AtlasError):
        resolve_layers("12", 12)
    with pytest.raises(AtlasError):
        resolve_layers("last", 12)
