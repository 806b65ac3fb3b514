"""One traced forward pass of a vision tower, with named activations, and how the tower reads its last residual
stream with every statistic frozen.

Every analysis that looks inside a tower (the direct-effect decomposition, the neurons' second-order effects,
the saliency baselines) reads one forward pass, run by the tower's adapter (`towers.py` picks it), block by
block, keeping only the activations it asks for. Names follow TransformerLens's scheme:

    hook_embed                          [B, N, W]      residual stream entering block 0
    blocks.{l}.ln1.hook_scale           [B, N]         ln_1's sigma at each token (stats dtype)
    blocks.{l}.attn.hook_pattern        [B, H, N, N]   attention probabilities, every query row
    blocks.{l}.attn.hook_pattern_pooled [B, H, n, N]   ... only the n rows the readout reads
    blocks.{l}.attn.hook_v              [B, H, N, hd]  values (bias included)
    blocks.{l}.attn.hook_z_pooled       [B, H, n, hd]  each head's attention output at the read rows, before W_O
    blocks.{l}.attn.hook_sub_scale      [B, n]         1 / sigma of the LayerNorm inside attention (EVA's sub-LN)
    blocks.{l}.mlp.hook_post            [B, N, M]      a neuron's activation: the MLP's hidden value entering its
                                                       output projection (divided by the sigma of a norm inside
                                                       the MLP, EVA's scale_mlp, where there is one)
    blocks.{l}.hook_mlp_out_pooled      [B, n, W]      the MLP's write (LayerScale included) at the read rows
    hook_resid_final                    [B, N, W]      residual stream after the last block
    pool.hook_pattern                   [B, K, n]      an attention pool's weights over the read rows
    hook_image_embed                    [B, D]         the tower's output (encode_image, not normalised)

Token 0 is the first token of the sequence (the class token when there is one). The read rows are the tokens
the readout reads: the class token, the patch tokens (average pooling), or every token an attention-pool head
attends to.

The readout, frozen. The tower's output is an affine function of its last residual stream once each image's
statistics are fixed at the values the forward computed: every LayerNorm's scale sigma, the attention pool's
weights over tokens, the pool MLP's gates g = act(y) / y. `Readout` holds that function for one batch:

    out = post( sum_k  (sum_t weights[b, k, t] x_t) @ A[k] @ B[k] ) + const

with `A`, `B` weights only (`ReadMaps`: norm gain and centring, value and output projections folded in) and
`post` the per-image affine chain after pooling (the pool's residual MLP with frozen gates, a norm, heads), so
every residual write has one linear contribution and the parts sum exactly to the output (docs/decomposition.md).
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch

EMBED = "hook_embed"
LN1_SCALE = "blocks.{}.ln1.hook_scale"
PATTERN = "blocks.{}.attn.hook_pattern"
PATTERN_POOLED = "blocks.{}.attn.hook_pattern_pooled"
VALUES = "blocks.{}.attn.hook_v"
Z_POOLED = "blocks.{}.attn.hook_z_pooled"
SUB_SCALE = "blocks.{}.attn.hook_sub_scale"
MLP_POST = "blocks.{}.mlp.hook_post"
MLP_OUT_POOLED = "blocks.{}.hook_mlp_out_pooled"
RESID_FINAL = "hook_resid_final"
POOL_PATTERN = "pool.hook_pattern"
IMAGE_EMBED = "hook_image_embed"

Keep = Collection[str] | Callable[[str], bool]


def wants(keep: Keep) -> Callable[[str], bool]:
    return keep if callable(keep) else set(keep).__contains__


class ActivationCache(dict):
    """name -> tensor, for the names a trace was asked to keep; `pooled` is the slice of read rows."""

    def __init__(self, pooled: slice):
        super().__init__()
        self.pooled = pooled
        self.readout: Readout | None = None

    def layers(self, name: str) -> dict[int, torch.Tensor]:
        """{layer: tensor} of a per-block name such as PATTERN, for the layers that were kept."""
        prefix, suffix = name.split("{}")
        return {int(k[len(prefix):-len(suffix)]): v for k, v in self.items()
                if k.startswith(prefix) and k.endswith(suffix) and k[len(prefix):-len(suffix)].isdigit()}


@dataclass(frozen=True)
class Norm:
    """A LayerNorm's affine parameters (None when absent) and epsilon."""
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def sigma(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """A LayerNorm's scale over the last dimension, [...]: sqrt(var + eps), in `dtype`."""
    return torch.sqrt(x.to(dtype).var(-1, unbiased=False) + eps)


def centre(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


@dataclass
class HeadWrite:
    """What the heads of one layer write into the residual stream, per unit of their attention output z:
    head h at a token writes z_h @ matrix[h] (times `scale` at that token) plus `bias` once per token."""
    matrix: torch.Tensor           # [H, hd, W]  W_O's slice, LayerScale and a sub-LN's gain and centring folded in
    bias: torch.Tensor             # [W]  the output bias (and a sub-LN's beta through W_O), LayerScale included
    scaled: bool = False           # the write at a token is divided by the sub-LN's sigma there (SUB_SCALE)


@dataclass
class ReadMaps:
    """The readout's weight-only factors: channel k maps a pooled residual vector through A[k] then B[k]."""
    A: torch.Tensor                # [K, W, r]
    B: torch.Tensor | None         # [K, r, Dq], or None when K == 1 and the channel ends in Dq = r


class Step:
    """One affine step after pooling, with per-image statistics frozen: y -> lin(y) + bias."""

    def lin(self, y: torch.Tensor) -> torch.Tensor:          # [B, M, din] -> [B, M, dout]
        raise NotImplementedError

    def bias(self, batch: int) -> torch.Tensor | None:        # [B, 1, dout] or None
        raise NotImplementedError

    def lin_T(self, d: torch.Tensor) -> torch.Tensor:        # the transpose: [B, M, dout] -> [B, M, din]
        raise NotImplementedError


@dataclass
class LinearStep(Step):
    weight: torch.Tensor           # [dout, din]
    b: torch.Tensor | None

    def lin(self, y):
        return y @ self.weight.T

    def bias(self, batch):
        return None if self.b is None else self.b.expand(batch, 1, -1)

    def lin_T(self, d):
        return d @ self.weight


@dataclass
class NormStep(Step):
    """A LayerNorm with its scale frozen per image: gamma * centre(y) / sigma + beta."""
    gamma: torch.Tensor            # [d]
    beta: torch.Tensor | None
    inv_sigma: torch.Tensor        # [B]
    centred: bool = True           # False: an Identity in the norm's place

    def lin(self, y):
        return (centre(y) if self.centred else y) * self.gamma * self.inv_sigma[:, None, None]

    def bias(self, batch):
        return None if self.beta is None else self.beta.expand(batch, 1, -1)

    def lin_T(self, d):
        d = d * self.gamma
        return (centre(d) if self.centred else d) * self.inv_sigma[:, None, None]


@dataclass
class ResidualMLPStep(Step):
    """y + W2 (g * (W1 norm(y) + b1)) + b2 with the activation's gates g = act(u) / u frozen per image."""
    norm: NormStep
    w1: torch.Tensor               # [M, d]
    b1: torch.Tensor | None
    gates: torch.Tensor            # [B, M]
    w2: torch.Tensor               # [d, M]
    b2: torch.Tensor | None

    def branch(self, y):
        """The part of lin(y) that runs through the MLP."""
        return ((self.norm.lin(y) @ self.w1.T) * self.gates[:, None]) @ self.w2.T

    def lin(self, y):
        return y + self.branch(y)

    def bias(self, batch):
        u = self.norm.bias(batch)
        u = (u @ self.w1.T if u is not None else 0) + (self.b1 if self.b1 is not None else 0)
        out = (u * self.gates[:, None]) @ self.w2.T
        return out + self.b2 if self.b2 is not None else out

    def lin_T(self, d):
        return d + self.norm.lin_T(((d @ self.w2) * self.gates[:, None]) @ self.w1)


@dataclass
class Readout:
    """The frozen readout of one batch (see the module docstring)."""
    weights: torch.Tensor          # [B, K, n]  each channel's weight on each read row
    pre_const: torch.Tensor        # [B, Dq]  what no residual write owns, before `steps`
    steps: list[Step] = field(default_factory=list)
    pool_pattern: torch.Tensor | None = None   # [B, K, n] an attention pool's weights (before 1 / sigma)
    pool_out: torch.Tensor | None = None       # [B, D] the output recomputed through those weights (differentiable
                                               # in them: the gradient methods read the pool's attention)

    def post(self, y: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """[B, ..., Dq] -> [B, ..., D] through the steps (their linear parts only unless `bias`)."""
        shape = y.shape
        y = y.reshape(shape[0], -1, shape[-1])
        for s in self.steps:
            b = s.bias(shape[0]) if bias else None
            y = s.lin(y) if b is None else s.lin(y) + b
        return y.reshape(*shape[:-1], y.shape[-1])

    def post_T(self, d: torch.Tensor) -> torch.Tensor:
        """The transpose of the linear part: [B, K', D] -> [B, K', Dq] (directions read back before the steps)."""
        for s in reversed(self.steps):
            d = s.lin_T(d)
        return d

    def const(self) -> torch.Tensor:
        """[B, D]: the output's constant part, pre_const through the steps with their biases."""
        return self.post(self.pre_const, bias=True)

    def mlp_branch(self, y: torch.Tensor) -> torch.Tensor:
        """[B, Dq] -> [B, D]: the part of post(y) that runs through a pool MLP's frozen gates (0 without one)."""
        y = y.reshape(y.shape[0], 1, -1)
        out, seen = torch.zeros_like(y), False
        for s in self.steps:
            if isinstance(s, ResidualMLPStep):
                out, seen = out + s.branch(y), True
            y = s.lin(y)
            if seen and not isinstance(s, ResidualMLPStep):
                out = s.lin(out)
        return out[:, 0] if seen else torch.zeros(y.shape[0], y.shape[-1], dtype=y.dtype, device=y.device)


class Tower:
    """What the decomposition needs of a vision tower; one adapter per family (tower_openclip.py, tower_timm.py)."""
    family: str                    # e.g. 'open_clip ViT', 'timm ViT', 'timm EVA'
    pool_type: str                 # 'tok' | 'avg' | 'map'
    n_layers: int
    n_heads: int
    width: int
    head_dim: int
    embed_dim: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    prefix: int                    # tokens before the patch grid (a class token, registers)
    stats_dtype: torch.dtype       # float64 for a float64 model, float32 otherwise

    def pooled(self) -> slice:
        """The rows the readout reads."""
        raise NotImplementedError

    def run(self, images: torch.Tensor, keep: Keep) -> ActivationCache:
        """The forward on `images`, keeping the named activations `keep` asks for; the cache's `readout` is set
        when RESID_FINAL is kept. Gradients flow when enabled."""
        raise NotImplementedError

    def readout(self, resid_final: torch.Tensor) -> Readout:
        """The frozen readout of a batch from its last residual stream [B, N, W] (what `run` sets on the cache)."""
        raise NotImplementedError

    def head_write(self, layer: int) -> HeadWrite:
        raise NotImplementedError

    def read_maps(self) -> ReadMaps:
        raise NotImplementedError

    #: the readout has per-image steps after pooling (an attention pool's MLP, a norm after pooling), so an
    #: effect's direction in the embedding depends on the image through them
    readout_post: bool = False

    def neuron_unsupported_reason(self) -> str | None:
        """Why a neuron's write is not its activation (MLP_POST) times a fixed vector, or None."""
        raise NotImplementedError

    def ln1(self, layer: int) -> Norm:
        """The norm before a block's attention (weight None when it has no gain)."""
        raise NotImplementedError

    def value_weight(self, layer: int) -> torch.Tensor:
        """[W_out, W_in]: W_V of every head, stacked."""
        raise NotImplementedError

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """[W, M]: column n is what neuron n writes per unit of its activation (before LayerScale)."""
        raise NotImplementedError

    def mlp_scale(self, layer: int) -> torch.Tensor | None:
        """LayerScale gamma after the MLP, or None."""
        raise NotImplementedError
