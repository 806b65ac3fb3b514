"""One traced forward pass of a vision tower, with named activations.

Every analysis that looks inside the tower (the direct-effect decomposition, the neurons' second-order effects,
the saliency baselines) reads one forward pass, run here, block by block, keeping only the activations it asks
for. Names follow TransformerLens's scheme:

    hook_embed                          [B, N, W]      residual stream entering block 0 (after ln_pre)
    blocks.{l}.ln1.hook_scale           [B, N]         ln_1's sigma at each token (stats dtype)
    blocks.{l}.attn.hook_pattern        [B, H, N, N]   attention probabilities, every query row
    blocks.{l}.attn.hook_pattern_pooled [B, H, n, N]   ... only the n pooled query rows
    blocks.{l}.attn.hook_v              [B, H, N, hd]  values (bias included)
    blocks.{l}.attn.hook_z_pooled       [B, H, n, hd]  each head's attention output at the pooled rows, before W_O
    blocks.{l}.mlp.hook_post            [B, N, M]      the MLP's hidden activations (a neuron's activation)
    blocks.{l}.hook_mlp_out_pooled      [B, n, W]      the MLP's write (LayerScale included) at the pooled rows
    hook_resid_final                    [B, N, W]      residual stream after the last block
    hook_image_embed                    [B, D]         the tower's output (encode_image, not normalised)

Token 0 is the class token; the pooled rows are the tokens the readout pools (the class token, or every patch
token for average pooling). A tower family is taught to clip-atlas once, here: its adapter runs the forward and
hands out the weights the folds need (`Tower`). This module is the only one that touches a tower's internals.

Only open_clip's own VisionTransformer is a tower family today; `unsupported_reason` says why others are not.
"""
from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

from compute.errors import AtlasError

EMBED = "hook_embed"
LN1_SCALE = "blocks.{}.ln1.hook_scale"
PATTERN = "blocks.{}.attn.hook_pattern"
PATTERN_POOLED = "blocks.{}.attn.hook_pattern_pooled"
VALUES = "blocks.{}.attn.hook_v"
Z_POOLED = "blocks.{}.attn.hook_z_pooled"
MLP_POST = "blocks.{}.mlp.hook_post"
MLP_OUT_POOLED = "blocks.{}.hook_mlp_out_pooled"
RESID_FINAL = "hook_resid_final"
IMAGE_EMBED = "hook_image_embed"

Keep = Collection[str] | Callable[[str], bool]


class ActivationCache(dict):
    """name -> tensor, for the names a trace was asked to keep; `pooled` is the slice of pooled token rows."""

    def __init__(self, pooled: slice):
        super().__init__()
        self.pooled = pooled

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


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why this model's vision tower cannot be traced and decomposed, or None."""
    visual = getattr(model, "visual", None)
    if visual is None:
        return "the model has no vision tower"
    kind = type(visual).__name__
    if not isinstance(visual, VisionTransformer):
        why = {"ModifiedResNet": "a ResNet tower (attention pooling over conv features)",
               "TimmModel": "a timm tower (EVA, SigLIP, ConvNeXt, PE-Core: different blocks and pooling heads)"}
        return f"its vision tower is {why.get(kind, kind)}; only open_clip VisionTransformer towers decompose"
    if visual.attn_pool is not None:
        return "its vision tower ends in an attentional pooler (CoCa-style), which is not a sum of token terms"
    if visual.pool_type not in ("tok", "avg"):
        return f"pool_type {visual.pool_type!r} has no single embedding to decompose"
    blocks = visual.transformer.resblocks
    if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
        return "its blocks use custom attention (qk-norm, scaled cosine, head scales or inner norms)"
    if any(hasattr(b, "ln_1_kv") for b in blocks):
        return "its blocks use cross-attention"
    if not visual.transformer.batch_first:
        return "its transformer is not batch-first"
    return None


def _gamma(layer_scale: torch.nn.Module) -> torch.Tensor | None:
    return layer_scale.gamma if hasattr(layer_scale, "gamma") else None


class Tower:
    """open_clip's VisionTransformer (class-token or average pooling), read through one traced forward."""

    def __init__(self, model: torch.nn.Module):
        reason = unsupported_reason(model)
        if reason:
            raise AtlasError(f"cannot decompose: {reason}")
        self.visual = model.visual
        self.blocks = list(self.visual.transformer.resblocks)
        self.n_layers = len(self.blocks)
        attn = self.blocks[0].attn
        self.n_heads, self.width = attn.num_heads, attn.embed_dim
        self.head_dim = self.width // self.n_heads
        self.grid = tuple(self.visual.grid_size)
        self.pool_type = self.visual.pool_type
        #: the pooled rows are averaged before the final norm (one sigma) rather than after (one per row)
        self.norm_after_pool = bool(self.visual.final_ln_after_pool)
        p = next(self.visual.parameters())
        #: the dtype of statistics and folds: float64 for a float64 model, float32 otherwise
        self.stats_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32

    # ---- weights the folds need (as stored; callers cast)
    def pooled(self) -> slice:
        """The residual rows the readout pools: the class token, or every patch token (average pooling)."""
        return slice(0, 1) if self.pool_type == "tok" else slice(1, None)

    def final_norm(self) -> Norm:
        ln = self.visual.ln_post
        return Norm(ln.weight, ln.bias, ln.eps)

    def proj(self) -> torch.Tensor | None:
        """[W, D] the readout projection, or None (identity)."""
        return self.visual.proj

    def ln1(self, layer: int) -> Norm:
        ln = self.blocks[layer].ln_1
        return Norm(ln.weight, ln.bias, ln.eps)

    def value_weight(self, layer: int) -> torch.Tensor:
        """[W_out, W_in]: W_V of every head, stacked."""
        return self.blocks[layer].attn.in_proj_weight[2 * self.width:]

    def out_proj(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_O [W_out, W_in], its bias)."""
        o = self.blocks[layer].attn.out_proj
        return o.weight, o.bias

    def attn_scale(self, layer: int) -> torch.Tensor | None:
        """LayerScale gamma after attention, or None."""
        return _gamma(self.blocks[layer].ls_1)

    def mlp_scale(self, layer: int) -> torch.Tensor | None:
        """LayerScale gamma after the MLP, or None."""
        return _gamma(self.blocks[layer].ls_2)

    def mlp_out_weight(self, layer: int) -> torch.Tensor:
        """[W, M]: column n is what neuron n writes per unit of activation (before LayerScale)."""
        return self.blocks[layer].mlp.c_proj.weight

    def neuron_unsupported_reason(self) -> str | None:
        """Why a neuron's write is not act * a column of the output weight, or None."""
        for blk in self.blocks:
            mlp = blk.mlp
            if not all(hasattr(mlp, n) for n in ("c_fc", "gelu", "c_proj")):
                return "its MLP blocks are not c_fc -> activation -> c_proj"
            if not isinstance(getattr(mlp, "ln", torch.nn.Identity()), torch.nn.Identity):
                return "its MLP blocks normalise inside the MLP (scale_fc), so a neuron's write is not act * weight"
        return None

    # ---- the forward
    def run(self, images: torch.Tensor, keep: Keep) -> ActivationCache:
        """The tower's forward on `images`, keeping the named activations `keep` asks for (a collection of names
        or a predicate). The residual stream equals open_clip's own forward; gradients flow when enabled."""
        wanted = keep if callable(keep) else set(keep).__contains__
        cache = ActivationCache(self.pooled())
        sl = cache.pooled
        x = self.visual._embeds(images)
        if wanted(EMBED):
            cache[EMBED] = x
        for i, blk in enumerate(self.blocks):
            if wanted(LN1_SCALE.format(i)):
                cache[LN1_SCALE.format(i)] = torch.sqrt(x.to(self.stats_dtype).var(-1, unbiased=False) + blk.ln_1.eps)
            x = x + blk.ls_1(self._attention(i, blk, blk.ln_1(x), sl, wanted, cache))
            name = MLP_POST.format(i)
            if wanted(name):
                mlp = blk.mlp
                cache[name] = mlp.gelu(mlp.c_fc(blk.ln_2(x)))
                mlp_out = blk.ls_2(mlp.c_proj(cache[name]))
            else:
                mlp_out = blk.ls_2(blk.mlp(blk.ln_2(x)))
            if wanted(MLP_OUT_POOLED.format(i)):
                cache[MLP_OUT_POOLED.format(i)] = mlp_out[:, sl]
            x = x + mlp_out
        if wanted(RESID_FINAL):
            cache[RESID_FINAL] = x
        if wanted(IMAGE_EMBED):
            pooled, _ = self.visual._pool(x)
            cache[IMAGE_EMBED] = pooled @ self.visual.proj if self.visual.proj is not None else pooled
        return cache

    def _attention(self, i: int, blk, h: torch.Tensor, sl: slice, wanted, cache: ActivationCache) -> torch.Tensor:
        """The block's attention, written out (nn.MultiheadAttention's fused path hides its pattern); returns the
        output after W_O and its bias."""
        B, N, W = h.shape
        H, hd = self.n_heads, self.head_dim
        a = blk.attn
        qkv = F.linear(h, a.in_proj_weight, a.in_proj_bias).view(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                            # (B, H, N, hd)
        if wanted(PATTERN.format(i)):
            p = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)     # (B, H, N, N)
            cache[PATTERN.format(i)] = p
            z = p @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v)
        if wanted(PATTERN_POOLED.format(i)):
            cache[PATTERN_POOLED.format(i)] = torch.softmax((q[:, :, sl] @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        if wanted(VALUES.format(i)):
            cache[VALUES.format(i)] = v
        if wanted(Z_POOLED.format(i)):
            cache[Z_POOLED.format(i)] = z[:, :, sl]
        return F.linear(z.transpose(1, 2).reshape(B, N, W), a.out_proj.weight, a.out_proj.bias)
