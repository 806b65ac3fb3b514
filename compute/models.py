"""Model registry and loading: `NAME`, `NAME:TAG`, `NAME:/path/weights.pt`, `NAME:random`, `local-dir:/path`.

One entry point, `load_model(spec)`, returns the model, its preprocessing, its
tokenizer and a `ModelInfo` describing the vision tower the decomposition needs.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import open_clip
import torch
from huggingface_hub import constants
from PIL import Image
from tqdm import tqdm

from compute.errors import AtlasError
from compute.maths.decompose import Decomposer
from compute.maths.segment import TokenMaps
from compute.maths.trace import Tower
from compute.organisms import ORGANISMS
from compute.maths.towers import tower, unsupported_reason
from compute.timm_archs import register_timm_archs

CONFIG_DIR = Path(__file__).parent / "model_configs"
WEIGHTS_DIR = Path(__file__).parent / "shapes" / "weights"
# Each organism's weights lie in WEIGHTS_DIR, named for its architecture.
SHAPES_WEIGHTS = WEIGHTS_DIR / "clip-atlas-shapes.safetensors"
#: The Shapes CLIP fine-tuned on a world with a spurious cue (`clip-atlas shapes spurious`).
SPURIOUS_WEIGHTS = WEIGHTS_DIR / "shapes-spurious.safetensors"


def organism_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{ORGANISMS[name]}.safetensors"


#: Named models: short name -> (open_clip architecture, pretrained tag or weights path).
REGISTRY: dict[str, tuple[str, str]] = {
    **{name: (arch, str(organism_weights(name))) for name, arch in ORGANISMS.items()},
    "shapes-spurious": ("clip-atlas-shapes", str(SPURIOUS_WEIGHTS)),
    "ViT-B-16:openai": ("ViT-B-16-quickgelu", "openai"),
    "ViT-B-32:openai": ("ViT-B-32-quickgelu", "openai"),
    "ViT-L-14:openai": ("ViT-L-14-quickgelu", "openai"),
    "ViT-B-16:laion2b_s34b_b88k": ("ViT-B-16", "laion2b_s34b_b88k"),
    "ViT-B-32:datacomp_m_s128m_b4k": ("ViT-B-32", "datacomp_m_s128m_b4k"),
    "ViT-L-14:laion2b_s32b_b82k": ("ViT-L-14", "laion2b_s32b_b82k"),
    "ViT-H-14:laion2b_s32b_b79k": ("ViT-H-14", "laion2b_s32b_b79k"),
    "ViT-B-16-SigLIP:webli": ("ViT-B-16-SigLIP", "webli"),
    "ViT-L-16-SigLIP-256:webli": ("ViT-L-16-SigLIP-256", "webli"),
    "ViT-SO400M-14-SigLIP:webli": ("ViT-SO400M-14-SigLIP", "webli"),
    "ViT-B-16-SigLIP2:webli": ("ViT-B-16-SigLIP2", "webli"),
    "ViT-L-16-SigLIP2-256:webli": ("ViT-L-16-SigLIP2-256", "webli"),
    "ViT-SO400M-14-SigLIP2:webli": ("ViT-SO400M-14-SigLIP2", "webli"),
    "EVA02-B-16:merged2b_s8b_b131k": ("EVA02-B-16", "merged2b_s8b_b131k"),
    "EVA02-L-14:merged2b_s4b_b131k": ("EVA02-L-14", "merged2b_s4b_b131k"),
    "PE-Core-B-16:meta": ("PE-Core-B-16", "meta"),
    "PE-Core-L-14-336:meta": ("PE-Core-L-14-336", "meta"),
}
#: Environment variable naming a local copy of a Hugging Face tokenizer (SigLIP's is fetched by name otherwise).
TOKENIZER_ENV = "CLIP_ATLAS_TOKENIZER"
_QUICKGELU_TAGS = ("openai", "metaclip", "dfn")


@dataclass(frozen=True)
class ModelInfo:
    """What the store records about a model."""
    spec: str
    architecture: str
    tag: str
    random_weights: bool
    layers: int
    heads: int
    width: int
    embed_dim: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    pool_type: str                  # tok | avg | map (an attention-pool head)
    family: str = "open_clip ViT"   # the tower family (compute.maths.towers.FAMILIES)
    prefix_tokens: int = 1          # tokens before the patch grid (a class token, registers)
    parameters: int = 0             # the vision tower's parameters
    training: str = ""              # what the weights were trained on, as far as the registry knows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    info: ModelInfo

    _decomposers: dict = field(default_factory=dict, repr=False)

    @property
    def tower(self) -> Tower:
        """The vision tower as the traced forward reads it."""
        if "tower" not in self._decomposers:
            self._decomposers["tower"] = tower(self.model)
        return self._decomposers["tower"]

    def decomposer(self, head_layers: tuple[int, ...] = (), token_layers: tuple[int, ...] = ()):
        """A Decomposer for this model, built once per layer selection (its fold matrices cost a few GFLOP)."""
        key = (tuple(head_layers), tuple(token_layers))
        if key not in self._decomposers:
            self._decomposers[key] = Decomposer(self.model, head_layers=key[0], token_layers=key[1])
        return self._decomposers[key]

    @torch.no_grad()
    def token_maps(self, image: Image.Image, layers: list[int] | None = None) -> TokenMaps:
        """One image's per-token direct contributions through every head of `layers` (all by default)."""
        layers = list(range(self.info.layers)) if layers is None else layers
        pixels = self.preprocess(image)[None].to(self.device)
        d = self.decomposer(token_layers=tuple(layers))(pixels)
        return TokenMaps(layers, d.tokens[0], tuple(self.info.grid), self.info.prefix_tokens)

    def drop_text_tower(self) -> None:
        """Free the text tower's weights (a third of a ViT-B CLIP's memory) in a model used for images only."""
        for name in ("transformer", "token_embedding", "ln_final", "text"):
            if isinstance(getattr(self.model, name, None), torch.nn.Module):
                setattr(self.model, name, None)
        gc.collect()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """L2-normalised text embeddings [K, D] (float32, on the model's device)."""
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc="encode texts", unit="batch", disable=not progress):
            tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)


def family_of(arch: str) -> tuple[str, str | None]:
    """(tower family, why it is refused or None) of an open_clip architecture, from its config alone (no weights
    are built: a registry listing must be instant)."""
    register_configs()
    cfg = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    name = cfg.get("timm_model_name")
    if name is None:
        if cfg.get("layers") is not None and not isinstance(cfg.get("layers"), int):
            return "ResNet", "a ResNet tower (attention pooling over conv features)"
        if cfg.get("attentional_pool"):
            return "open_clip ViT", "an attentional pooler (CoCa-style)"
        return "open_clip ViT", None
    if name.startswith(("eva", "vit_pe")):
        return "timm EVA", None
    if name.startswith("vit"):
        return "timm ViT", None
    return f"timm {name.split('_')[0]}", "not a ViT tower: its features are not a sum of token writes"


def register_configs() -> None:
    """Make the project's own open_clip configs (the Shapes organisms) and timm towers known to open_clip."""
    register_timm_archs()
    if "clip-atlas-shapes" not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


def parse_spec(spec: str) -> tuple[str, str | None]:
    """'NAME[:TAG]' -> (open_clip architecture, tag or path or None), applying the registry."""
    spec = spec.strip()
    if not spec:
        raise AtlasError("empty model name; try e.g. 'shapes' or 'ViT-B-32:openai'")
    if spec.startswith("local-dir:"):
        return spec, None
    if spec in REGISTRY:
        return REGISTRY[spec]
    name, _, tag = spec.partition(":")
    return name, (tag or None)


def _quickgelu_arch(arch: str, tag: str | None, available: list[str]) -> tuple[str, bool]:
    """Tags trained with QuickGELU need the -quickgelu config; open_clip only warns otherwise."""
    if not tag or not tag.lower().startswith(_QUICKGELU_TAGS) or arch.endswith("-quickgelu"):
        return arch, False
    if f"{arch}-quickgelu" in available:
        return f"{arch}-quickgelu", False
    return arch, True


@functools.lru_cache(maxsize=1)
def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        host = urlparse(constants.ENDPOINT).hostname or ""
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except (OSError, ImportError, ValueError):
        return False


def _info(spec: str, arch: str, tag: str, random_weights: bool, model) -> ModelInfo:
    t = tower(model)
    return ModelInfo(
        spec=spec, architecture=arch, tag=tag, random_weights=random_weights, layers=t.n_layers, heads=t.n_heads,
        width=t.width, embed_dim=t.embed_dim, grid=tuple(t.grid), image_size=tuple(t.image_size),
        pool_type=t.pool_type, family=t.family, prefix_tokens=t.prefix,
        parameters=sum(p.numel() for p in model.visual.parameters()), training=training_data(spec, tag, random_weights),
    )


def training_data(spec: str, tag: str | None, random_weights: bool) -> str:
    """One line on what the weights saw: an organism's recipe from its training record, else the pretrained tag
    (open_clip's tags name the dataset), a checkpoint file's name, or 'random weights'."""
    if random_weights:
        return "random weights"
    name = spec.partition(":")[0]
    if name in ORGANISMS or name == "shapes-spurious":
        record = Path(str(tag)).with_suffix(".json")
        try:
            rec = json.loads(record.read_text())
            cfg = rec["config"]
            return f"Shapes world, {cfg['steps']} x {cfg['batch_size']} scenes" + (" (fine-tuning)" if "base" in rec else "")
        except (OSError, ValueError, KeyError):
            return "Shapes world"
    return Path(tag).name if tag and os.sep in tag else (tag or "")


class OfflineTokenizer:
    """For a randomly initialised model whose tokenizer cannot be had offline (SigLIP's Hugging Face tokenizer):
    CLIP's own BPE, ids folded into the text tower's vocabulary. A random text tower has no vocabulary to honour,
    so any deterministic tokenizer serves; a real checkpoint never gets this one."""

    def __init__(self, vocab_size: int, context_length: int):
        self.inner = open_clip.SimpleTokenizer(context_length=context_length)
        self.vocab_size, self.context_length = vocab_size, context_length

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        return self.inner(texts, context_length or self.context_length) % self.vocab_size


def _tokenizer(arch: str, random_weights: bool, model) -> Callable:
    """open_clip's tokenizer for `arch`; a local copy named by CLIP_ATLAS_TOKENIZER for Hugging Face tokenizers;
    for random weights offline, OfflineTokenizer; otherwise a one-line error saying how to pass a local copy."""
    cfg = open_clip.get_model_config(arch) or {}
    hf_name = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
    local = os.environ.get(TOKENIZER_ENV)
    try:
        if hf_name and local:
            text = cfg["text_cfg"]
            return open_clip.tokenizer.HFTokenizer(local, context_length=text.get("context_length", 64),
                                                   **text.get("tokenizer_kwargs", {}))
        return open_clip.get_tokenizer(arch)
    except (ImportError, OSError, ValueError) as e:
        if random_weights:
            vocab = getattr(model, "vocab_size", None) or cfg.get("text_cfg", {}).get("vocab_size", 49408)
            return OfflineTokenizer(vocab, cfg.get("text_cfg", {}).get("context_length", 77))
        why = "the transformers package is missing" if isinstance(e, ImportError) else "it cannot be fetched offline"
        raise AtlasError(f"{arch} needs the Hugging Face tokenizer {hf_name or arch!r} and {why}: save it with "
                         f"AutoTokenizer.from_pretrained({hf_name!r}).save_pretrained(DIR) where there is network, "
                         f"then set {TOKENIZER_ENV}=DIR (and pip install transformers)") from None


def load_model(spec: str, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedModel:
    """Load an open_clip model by spec; refuse what cannot be decomposed with a one-line reason."""
    register_configs()
    arch, tag = parse_spec(spec)
    available = open_clip.list_models()
    random_weights = tag == "random"
    if not arch.startswith("local-dir:"):
        if arch not in available:
            raise AtlasError(f"unknown model {arch!r}; `clip-atlas models` lists the known names")
        arch, force_quick = _quickgelu_arch(arch, tag, available)
    else:
        force_quick = False
        if not Path(arch[len("local-dir:"):]).is_dir():
            raise AtlasError(f"no such directory for {arch!r}")
    organism = next((n for n, a in ORGANISMS.items() if a == arch and tag == str(organism_weights(n))), None)
    if organism and not organism_weights(organism).exists():
        raise AtlasError(f"the weights of {organism} are missing at {organism_weights(organism)}; "
                         f"run `clip-atlas shapes train --arch {organism}`")
    pretrained = None if random_weights else tag
    looks_like_path = pretrained is not None and (os.sep in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors", ".pth")))
    if looks_like_path and not Path(pretrained).is_file():
        raise AtlasError(f"checkpoint file not found: {pretrained}")
    if pretrained is not None and not looks_like_path and not arch.startswith("local-dir:"):
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            known = ", ".join(tags) or "none"
            raise AtlasError(f"unknown pretrained tag {pretrained!r} for {arch} (known: {known}; or pass a checkpoint path, or 'random')")
    hf_tokenizer = (open_clip.get_model_config(arch) or {}).get("text_cfg", {}).get("hf_tokenizer_name")
    needs_hub = (pretrained is not None and not looks_like_path) or bool(hf_tokenizer)
    if needs_hub and not _hub_reachable():
        # no network: let the hub client look in its local cache only, instead of retrying for a minute
        os.environ["HF_HUB_OFFLINE"] = "1"
        constants.HF_HUB_OFFLINE = True
    try:
        # open_clip logs (not raises) several problems; keep its chatter out of the user's terminal
        root_logger, level = logging.getLogger(), logging.getLogger().level
        with contextlib.redirect_stderr(io.StringIO()), torch.random.fork_rng(devices=[]):
            root_logger.setLevel(logging.ERROR)
            try:
                torch.manual_seed(0)  # a random model is the same random model every time it is loaded
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained, device=device, precision=precision,
                    force_quick_gelu=force_quick, pretrained_text=False, pretrained_image=False)
            finally:
                root_logger.setLevel(level)
    except (RuntimeError, OSError, ValueError) as e:
        if pretrained and not looks_like_path:
            raise AtlasError(
                f"cannot fetch weights {arch}:{pretrained} (no network?): download them elsewhere "
                f"and pass the file as {spec.split(':')[0]}:/path/to/weights, or use {spec.split(':')[0]}:random"
            ) from None
        raise AtlasError(f"cannot load {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    reason = unsupported_reason(model)
    if reason:
        raise AtlasError(f"{spec} is not supported: {reason}")
    model.eval()
    tokenizer = _tokenizer(arch, random_weights, model)
    return LoadedModel(model, preprocess, tokenizer, _info(spec, arch, tag or "", random_weights, model))
