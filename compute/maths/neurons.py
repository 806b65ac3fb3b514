"""Second-order effects of MLP neurons on the L2-normalised image embedding (Gandelsman, Efros, Steinhardt 2025).

Neuron n of MLP layer l writes w_n(i) = act_n(i) u_n into the residual stream at every token i, with
u_n = ls_2 * c_proj.weight[:, n]. A later layer l' reads the residual through ln_1, whose centring is
linear and whose scale 1/sigma_l'(i) is one number per token, taken from the actual forward pass. The
write reaches head h's output at the pooled token as

    sum_i a_l'h(0, i) act_n(i) / sigma_l'(i)  *  W_O,h W_V,h (gamma_l' * centred u_n)

(attention pattern a from the forward pass, value and output biases excluded: they belong to no neuron),
and the readout of the head decomposition (decompose.py: P, / sigma_post, / ||out||) carries it to the
embedding. Summing over every later layer and head, the chain is linear in act_n, so it factorises:

    effect_n(img) = sum_k s[img, k, n] G[k, n, :]                   k = (l', h) over later layers and heads
    s[img, k, n]  = sum_i e_k(img, i) act_n(img, i)                  e_k(i) = w a_l'h(0, i) / (sigma_l'(i) ||out||)
    G[k, n, :]    = (W_V,h (gamma_l' * centred u_n)) @ M_l'[h]       weights only, M the head readout matrix

with w the readout weight of the pooled token. G is computed once per model and layer; s costs
K x tokens x neurons per image, so all neurons of a layer cost little more than the forward pass
that produces a, sigma and act. Later MLPs are not traversed (the definition of a second-order effect).
Average pooling works the same way with e_k summed over the pooled query tokens.

Every effect lies in the span of G[:, n, :] (K dimensions), so over a set of images only the K x K
moments sum s s^T are needed: the norm on one image is sqrt(s^T (G_n G_n^T) s), and with
Q R = G_n^T the top eigenvector of R (sum s s^T) R^T mapped by Q is the top right singular vector of
the stacked effects [images, D]. Nothing [images, neurons, D] is ever built.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compute.errors import AtlasError
from compute.maths import trace as tr
from compute.maths.decompose import Decomposer
from compute.maths.towers import tower, unsupported_reason


def neuron_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why neuron effects cannot be computed for this model, or None (the head decomposition must fit too)."""
    return unsupported_reason(model) or tower(model).neuron_unsupported_reason()


def default_neuron_layers(n_layers: int) -> list[int]:
    """The layers the paper studies, relative to depth: from 2/3 of the depth to the second-to-last layer
    (ViT-B-32: 8, 9, 10; ViT-L-14: 16-22). The last layer has no later attention, so no second-order effect."""
    return list(range(min((2 * n_layers) // 3, n_layers - 2), n_layers - 1))


@dataclass
class NeuronBatch:
    """One batch's second-order coefficients; effects are `s @ G` per neuron."""
    s: torch.Tensor            # [B, K, n]   coefficients of each neuron on each later head's readout direction
    token_weights: torch.Tensor  # [B, K, N]  e_k(i): readout-weighted attention / sigma, per later head and token
    act: torch.Tensor          # [B, N, n]   the neurons' activations at every token
    direct: torch.Tensor       # [B, n]      the first-order (direct) effect norm, for comparison


@dataclass
class Trace:
    """What one forward pass leaves for the neuron coefficients of the recorded layers."""
    acts: dict[int, torch.Tensor]    # layer -> [B, N, MLP width]: post-activation values
    reads: dict[int, torch.Tensor]   # later layer -> [B, H, N]: e_k(i), readout-weighted attention / sigma
    w: torch.Tensor                  # [B, n_pooled]: readout weight / ||out|| per pooled token
    pooled: slice


@torch.no_grad()
def trace(dec: Decomposer, images: torch.Tensor, layers: tuple[int, ...]) -> Trace:
    """One forward pass recording the activations of MLP `layers` and, for every later attention layer, the pooled
    rows' attention divided by each token's ln_1 scale, weighted by the readout."""
    fd = dec.fold_dtype
    first = min(layers)
    later = range(first + 1, dec.n_layers)
    keep = {tr.MLP_POST.format(i) for i in layers} | {tr.PATTERN_POOLED.format(i) for i in later}
    keep |= {tr.LN1_SCALE.format(i) for i in later} | {tr.RESID_FINAL}
    cache = dec.tower.run(images, keep)
    sl, x = cache.pooled, cache[tr.RESID_FINAL]
    with torch.autocast(x.device.type, enabled=False):
        ro = cache.readout
        w = ro.weights[:, 0].to(fd)                                 # [B, n_pool]
        out = torch.einsum("bt,btw->bw", w, x[:, sl].to(fd)) @ dec.P + ro.pre_const
        w = w / out.norm(dim=-1, keepdim=True)
        reads = {i: torch.einsum("bt,bhti->bhi", w, cache[tr.PATTERN_POOLED.format(i)].to(fd))
                 / cache[tr.LN1_SCALE.format(i)][:, None] for i in later}
    return Trace(cache.layers(tr.MLP_POST), reads, w, sl)


class SecondOrder:
    """Second-order effects of the neurons `neurons` (all by default) of MLP layer `layer`."""

    def __init__(self, model: torch.nn.Module, layer: int, neurons: slice | None = None,
                 decomposer: Decomposer | None = None):
        """`decomposer`: a Decomposer of the same model to reuse (its fold matrices), e.g. a cached one."""
        reason = neuron_unsupported_reason(model)
        if reason:
            raise AtlasError(f"cannot compute neuron effects: {reason}")
        self.dec = decomposer or Decomposer(model)
        n_layers = self.dec.n_layers
        if not 0 <= layer < n_layers - 1:
            raise AtlasError(f"MLP layer {layer} has no later attention layer (the model has {n_layers} layers: "
                             f"use 0-{n_layers - 2})")
        self.layer = layer
        self.later = list(range(layer + 1, n_layers))
        self.n_total = self.dec.tower.mlp_out_weight(layer).shape[1]
        self.neurons = neurons or slice(0, self.n_total)
        if not 0 <= self.neurons.start < self.neurons.stop <= self.n_total:
            raise AtlasError(f"neurons {self.neurons.start}-{self.neurons.stop - 1} are outside layer {layer}'s "
                             f"{self.n_total} neurons")
        self.heads = [(l, h) for l in self.later for h in range(self.dec.n_heads)]
        self.G = self._fold()                                       # [K, n, D]

    @property
    def n(self) -> int:
        return self.G.shape[1]

    @torch.no_grad()
    def writes(self) -> torch.Tensor:
        """[n, W]: u_n, what each neuron writes per unit of activation (LayerScale included)."""
        tower, fd = self.dec.tower, self.dec.fold_dtype
        U = tower.mlp_out_weight(self.layer)[:, self.neurons].T.to(fd)   # [n, W]
        gamma = tower.mlp_scale(self.layer)
        return U * gamma.to(fd) if gamma is not None else U

    @torch.no_grad()
    def _fold(self) -> torch.Tensor:
        dec, fd = self.dec, self.dec.fold_dtype
        W, H, hd = dec.width, dec.n_heads, dec.head_dim
        U = self.writes()
        Uc = U - U.mean(-1, keepdim=True)
        out = []
        for l in self.later:
            ln = dec.tower.ln1(l)
            g = ln.weight.to(fd) if ln.weight is not None else torch.ones(W, dtype=fd, device=U.device)
            wv = dec.tower.value_weight(l).to(fd)                   # [W_out, W_in]
            vals = ((Uc * g) @ wv.T).view(-1, H, hd)                # [n, H, hd]
            out.append(torch.einsum("nhk,hkd->hnd", vals, dec.M[l]))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> NeuronBatch:
        return self.coefficients(trace(self.dec, images, (self.layer,)))

    @torch.no_grad()
    def coefficients(self, tr: Trace) -> NeuronBatch:
        """This layer's neurons' coefficients from a forward `trace` that recorded this layer (one trace can serve
        several layers and neuron slices)."""
        dec, fd = self.dec, self.dec.fold_dtype
        with torch.autocast(tr.w.device.type, enabled=False):
            act = tr.acts[self.layer][..., self.neurons].to(fd)
            e = torch.cat([tr.reads[l] for l in self.later], 1)     # [B, K, N]
            s = torch.einsum("bki,bin->bkn", e, act)
            u_read = (self.writes() @ dec.P).norm(dim=-1)           # [n]
            direct = (torch.einsum("bt,btn->bn", tr.w, act[:, tr.pooled])).abs() * u_read
        return NeuronBatch(s=s, token_weights=e, act=act, direct=direct)

    def effects(self, s: torch.Tensor, neurons: torch.Tensor | None = None) -> torch.Tensor:
        """[B, n, D] (or [B, len(neurons), D]): the second-order effects from a batch's coefficients."""
        G = self.G if neurons is None else self.G[:, neurons]
        s = s if neurons is None else s[:, :, neurons]
        return torch.einsum("bkn,knd->bnd", s, G)

    def token_effects(self, batch: NeuronBatch, neuron: int, directions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] (or [B, N, K'] projected on `directions` [D, K']): neuron `neuron`'s second-order effect
        split over the tokens it writes at; summed over tokens it is the neuron's effect."""
        G = self.G[:, neuron]                                       # [K, D]
        if directions is not None:
            G = G @ directions.to(G)
        coef = batch.token_weights * batch.act[:, None, :, neuron]  # [B, K, N]
        return torch.einsum("bki,kd->bid", coef, G)

    @torch.no_grad()
    def token_map(self, images: torch.Tensor, direction: torch.Tensor, neuron: int = 0) -> torch.Tensor:
        """[B, N]: each token's share of the neuron's effect, projected on a unit `direction` [D] (the neuron's
        principal direction or a text embedding); token 0 is the class token."""
        batch = self(images)
        return self.token_effects(batch, neuron, direction.reshape(-1, 1))[..., 0]

    def grams(self) -> torch.Tensor:
        """[n, K, K]: G_n G_n^T per neuron, so ||effect_n|| = sqrt(s^T Gram_n s)."""
        return torch.einsum("knd,jnd->nkj", self.G, self.G)


def effect_norms(s: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """[B, n]: ||effect_n(img)|| from the coefficients [B, K, n] and the per-neuron Grams [n, K, K]."""
    q = torch.einsum("bkn,nkj,bjn->bn", s, grams, s)
    return q.clamp_min(0).sqrt()


@dataclass
class Directions:
    direction: torch.Tensor    # [n, D] unit: the top right singular vector of the stacked effects
    share: torch.Tensor        # [n] its share of the effects' total energy (sum of squared norms)
    head_share: torch.Tensor   # [n, K] each later head's share of the per-head energies


def principal_directions(G: torch.Tensor, moments: torch.Tensor, sums: torch.Tensor) -> Directions:
    """From G [K, n, D], the running sum of s s^T [n, K, K] and of s [n, K]: each neuron's principal direction
    over the images (signed so that the mean effect points along it), without the [images, D] matrix."""
    Gt = G.permute(1, 2, 0)                                         # [n, D, K]
    Q, R = torch.linalg.qr(Gt)                                      # [n, D, K], [n, K, K]
    A = R @ moments @ R.transpose(1, 2)
    A = (A + A.transpose(1, 2)) / 2
    vals, vecs = torch.linalg.eigh(A)                               # ascending
    top = vecs[..., -1]                                             # [n, K]
    direction = torch.einsum("ndk,nk->nd", Q, top)
    mean_effect = torch.einsum("nk,knd->nd", sums, G)
    sign = torch.sign((direction * mean_effect).sum(-1))
    direction = direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    total = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    share = torch.where(total > 0, vals[..., -1] / total.clamp_min(1e-30), torch.zeros_like(total))
    per_head = torch.diagonal(moments, dim1=1, dim2=2) * (G ** 2).sum(-1).T   # [n, K]
    head_share = per_head / per_head.sum(-1, keepdim=True).clamp_min(1e-30)
    return Directions(F.normalize(direction, dim=-1), share.clamp(0, 1), head_share)


def sparse_texts(directions: torch.Tensor, texts: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """Non-negative orthogonal matching pursuit of unit `directions` [n, D] over unit text embeddings [T, D]:
    up to k texts per direction, each added greedily by its correlation with the residual (positive only),
    coefficients refitted by non-negative least squares on the chosen set. Returns (indices [n, k], -1 when
    fewer were chosen; coefficients [n, k]; the share of ||direction||^2 the combination explains [n])."""
    n = directions.shape[0]
    idx = torch.full((n, k), -1, dtype=torch.long)
    coef = torch.zeros(n, k, dtype=directions.dtype)
    explained = torch.zeros(n, dtype=directions.dtype)
    for j in range(n):
        d = directions[j]
        chosen: list[int] = []
        c = torch.zeros(0, dtype=d.dtype)
        resid = d.clone()
        for _ in range(k):
            corr = texts @ resid
            if chosen:
                corr[chosen] = -float("inf")
            best = int(corr.argmax())
            if corr[best] <= 1e-9:
                break
            chosen.append(best)
            c = nnls(texts[chosen].T, d)
            keep = c > 0
            chosen, c = [t for t, kp in zip(chosen, keep.tolist()) if kp], c[keep]
            resid = d - texts[chosen].T @ c if chosen else d.clone()
        idx[j, :len(chosen)] = torch.tensor(chosen, dtype=torch.long)
        coef[j, :len(chosen)] = c
        explained[j] = 1 - (resid @ resid) / (d @ d)
    return idx, coef, explained


def nnls(A: torch.Tensor, b: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """argmin_{x >= 0} ||A x - b|| for a few columns (Lawson-Hanson active set; exact at convergence)."""
    m = A.shape[1]
    x = torch.zeros(m, dtype=A.dtype)
    passive = torch.zeros(m, dtype=torch.bool)
    for _ in range(iters):
        grad = A.T @ (b - A @ x)
        cand = (~passive) & (grad > 1e-12)
        if not cand.any():
            break
        passive[int(torch.where(cand, grad, torch.full_like(grad, -float("inf"))).argmax())] = True
        while True:
            z = torch.zeros_like(x)
            z[passive] = torch.linalg.lstsq(A[:, passive], b[:, None]).solution[:, 0]
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = torch.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
    return x
