"""Model specs: registry, QuickGELU tags, local checkpoints and folders, random models, refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch

from compute.errors import AtlasError
from compute.models import (REGISTRY, SHAPES_WEIGHTS, WEIGHTS_DIR, _quickgelu_arch, load_model,
                            organism_weights, parse_spec)
from compute.organisms import ORGANISMS


def test_registry_has_the_paper_models_with_quickgelu_for_openai():
    paper = [k for k in REGISTRY if k.startswith("ViT-") and "SigLIP" not in k]
    assert len(paper) == 7                         # the CLIP-InterpreT six and the ICLR paper's ViT-H
    assert REGISTRY["ViT-B-16:openai"][0] == "ViT-B-16-quickgelu"
    assert REGISTRY["ViT-L-14:laion2b_s32b_b82k"] == ("ViT-L-14", "laion2b_s32b_b82k")
    for arch, tag in REGISTRY.values():
        if Path(tag).parent != WEIGHTS_DIR:            # the Shapes organisms' weights are files in the repository
            assert tag in open_clip.list_pretrained_tags_by_model(arch), (arch, tag)
    for name in ORGANISMS:
        assert REGISTRY[name] == (ORGANISMS[name], str(organism_weights(name)))


@pytest.mark.parametrize("arch,tag,expected", [
    ("ViT-B-32", "openai", ("ViT-B-32-quickgelu", False)),
    ("ViT-B-16", "metaclip_400m", ("ViT-B-16-quickgelu", False)),
    ("ViT-H-14", "dfn5b", ("ViT-H-14-quickgelu", False)),
    ("ViT-B-16", "laion2b_s34b_b88k", ("ViT-B-16", False)),
    ("ViT-B-32-quickgelu", "openai", ("ViT-B-32-quickgelu", False)),
])
def test_quickgelu_tags(arch, tag, expected):
    assert _quickgelu_arch(arch, tag, open_clip.list_models()) == expected


def test_parse_spec():
    assert parse_spec("ViT-B-32:openai") == ("ViT-B-32-quickgelu", "openai")
    assert parse_spec("ViT-B-32") == ("ViT-B-32", None)
    assert parse_spec("ViT-B-32:/tmp/w.pt") == ("ViT-B-32", "/tmp/w.pt")
    assert parse_spec("local-dir:/x") == ("local-dir:/x", None)


def _embed(loaded, seed=0):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return loaded.model.encode_image(x)


def test_local_checkpoint_file_and_local_dir_give_the_shapes_model(tmp_path):
    ref = _embed(load_model("shapes"))
    by_path = load_model(f"clip-atlas-shapes:{SHAPES_WEIGHTS}")
    assert torch.equal(_embed(by_path), ref) and not by_path.info.random_weights
    folder = tmp_path / "shapes-dir"
    folder.mkdir()
    cfg = json.loads((SHAPES_WEIGHTS.parent.parent.parent / "model_configs" / "clip-atlas-shapes.json").read_text())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    shutil.copy(SHAPES_WEIGHTS, folder / "open_clip_model.safetensors")
    assert torch.allclose(_embed(load_model(f"local-dir:{folder}")), ref, atol=1e-6)


def test_random_models_are_marked_and_reproducible():
    a, b = load_model("clip-atlas-shapes:random"), load_model("clip-atlas-shapes:random")
    assert a.info.random_weights and torch.equal(_embed(a), _embed(b))
    assert not torch.allclose(_embed(a), _embed(load_model("shapes")))


def test_model_info_shapes():
    info = load_model("ViT-B-32:random").info
    assert (info.layers, info.heads, info.width, info.embed_dim, info.grid) == (12, 12, 768, 512, (7, 7))


@pytest.mark.parametrize("spec,message", [
    ("local-dir:/no/such/dir", "no such directory"),
    ("convnext_base:random", "not supported"),
    ("RN50:random", "not supported"),
])
def test_refusals(spec, message):
    with pytest.raises(AtlasError, match=message):
        load_model(spec)


def test_a_missing_organism_says_how_to_train_it(monkeypatch, tmp_path):
    import compute.models as models
    missing = tmp_path / "clip-atlas-shapes-small.safetensors"
    monkeypatch.setattr(models, "organism_weights", lambda name: missing)
    with pytest.raises(AtlasError, match=r"run `clip-atlas shapes train --arch shapes-small`"):
        load_model(f"clip-atlas-shapes-small:{missing}")
