"""Second-order effects of MLP neurons on the L2-normalised image embedding (Gandelsman, Efros, Steinhardt 2025).

Neuron n of MLP layer l writes w_n(i) = act_n(i) u_n into the residual stream at every token i (u_n: its column of
the MLP's output weight, LayerScale included; the tower adapter says what act_n is, e.g. SwiGLU's gate times its
up-projection). A later layer l' reads the residual through ln_1, whose centring is linear and whose scale
1/sigma_l'(i) is one number per token, taken from the actual forward pass; head h's value projection W_V,h (no
bias: biases belong to no neuron), the actual attention a_l'h(t, i) of each read row t, and the head's write
matrix M_l'h (W_O's slice, LayerScale, and a sub-LN's gain and centring with its 1/sigma(t) frozen) carry it to
row t. The readout reads row t through channel k with weight E[k, t] (trace.Readout: one channel for a class
token, one per query head of an attention pool), then the channel's maps A[k] B[k], then the per-image steps
`post` (a pool's MLP with its gates frozen, norms after pooling). Every step is linear once the statistics are
frozen, so summed over later heads j = (l', h) and channels k the effect is

    effect_n(img) = post_img( sum_jk s[img, jk, n] G[jk, n, :] B[k] )               / ||out|| inside s
    s[img, jk, n] = sum_i e_jk(img, i) act_n(img, i)      e_jk(i) = sum_t E[k, t] sub_l'(t) a_l'h(t, i) / (sigma_l'(i) ||out||)
    G[jk, n, :]   = (W_V,h (gamma_l' * centred u_n)) M_l'h A[k]                      weights only

G is folded once per model and layer; s costs K x tokens x neurons per image (K = later heads x channels), so
all neurons of a layer cost little more than the forward pass that produces a, sigma and act. Later MLPs are not
traversed (the definition of a second-order effect).

For open_clip's ViTs (one channel, no B, no post) every effect lies in the span of G[:, n, :], so over a set of
images only the K x K moments sum s s^T are needed: the norm on one image is sqrt(s^T (G_n G_n^T) s), and with
Q R = G_n^T the top eigenvector of R (sum s s^T) R^T mapped by Q is the top right singular vector of the stacked
effects [images, D]. An attention pool's frozen MLP gates make `post` differ per image, so there the effects
are formed explicitly (`effects`) and their D x D moments kept instead; nothing [images, neurons, D] is built
either way.
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
    """One batch's second-order coefficients; effects are `SecondOrder.effects(s, readout=readout)`."""
    s: torch.Tensor              # [B, K, n]   coefficients of each neuron on each (later head, channel) direction
    token_weights: torch.Tensor  # [B, K, N]   e_jk(i), per (later head, channel) and token
    act: torch.Tensor            # [B, N, n]   the neurons' activations at every token
    direct: torch.Tensor         # [B, n]      the first-order (direct) effect norm, for comparison
    readout: tr.Readout          # the batch's frozen readout (its per-image steps)


@dataclass
class Trace:
    """What one forward pass leaves for the neuron coefficients of the recorded layers."""
    acts: dict[int, torch.Tensor]    # layer -> [B, N, MLP width]: the neurons' activations
    reads: dict[int, torch.Tensor]   # later layer -> [B, H, K, N]: e_jk(i)
    w: torch.Tensor                  # [B, K, n_pooled]: readout weights / ||out|| per channel and read row
    pooled: slice
    readout: tr.Readout


@torch.no_grad()
def trace(dec: Decomposer, images: torch.Tensor, layers: tuple[int, ...]) -> Trace:
    """One forward pass recording the activations of MLP `layers` and, for every later attention layer, the read
    rows' attention weighted by the readout, divided by each token's ln_1 scale."""
    fd = dec.fold_dtype
    later = range(min(layers) + 1, dec.n_layers)
    keep = {tr.MLP_POST.format(i) for i in layers} | {tr.PATTERN_POOLED.format(i) for i in later}
    keep |= {tr.LN1_SCALE.format(i) for i in later} | {tr.SUB_SCALE.format(i) for i in later} | {tr.RESID_FINAL}
    cache = dec.tower.run(images, keep)
    x = cache[tr.RESID_FINAL]
    with torch.autocast(x.device.type, enabled=False):
        ro = cache.readout
        E = ro.weights.to(fd)                                       # [B, K, n_pool]
        pre = dec.read(E, [x[:, cache.pooled]])[:, 0]
        out = (ro.post(pre) if ro.steps else pre) + ro.const().to(fd)
        w = E / out.norm(dim=-1)[:, None, None]
        reads = {}
        for i in later:
            wi = w * cache[tr.SUB_SCALE.format(i)].to(fd)[:, None] if i in dec.scaled else w
            reads[i] = (torch.einsum("bkt,bhti->bhki", wi, cache[tr.PATTERN_POOLED.format(i)].to(fd))
                        / cache[tr.LN1_SCALE.format(i)].to(fd)[:, None, None])
    return Trace(cache.layers(tr.MLP_POST), reads, w, cache.pooled, ro)


def state_bytes(dec: Decomposer, layer: int) -> int:
    """Bytes per neuron of `layer` that a pass over the images holds: its G, its moments (K x K in float64, or
    D x D in the model's precision where the readout has per-image steps) and its per-head blocks."""
    K_r, r = dec.A.shape[0], dec.A.shape[-1]
    J = (dec.n_layers - 1 - layer) * dec.n_heads
    K = J * K_r
    D = dec.tower.embed_dim
    simple = dec.simple and not dec.tower.readout_post
    item = torch.finfo(dec.fold_dtype).bits // 8
    return item * K * r + (8 * K * K if simple else item * D * D + 8 * D) + 8 * J * K_r * K_r


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
        #: one readout channel, no second factor and no per-image steps: effects are s @ G in the embedding
        self.simple = self.dec.simple and not self.dec.tower.readout_post
        self.channels = self.dec.A.shape[0]
        self.heads = [(l, h) for l in self.later for h in range(self.dec.n_heads)]   # the later heads j
        self.G = self._fold()                                       # [J * channels, n, r]

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
            g = dec.tower.ln1(l).weight
            g = g.to(fd) if g is not None else torch.ones(W, dtype=fd, device=U.device)
            wv = dec.tower.value_weight(l).to(fd)                   # [W_out, W_in]
            vals = ((Uc * g) @ wv.T).view(-1, H, hd)                # [n, H, hd]
            out.append(torch.einsum("nhd,hdkr->hknr", vals, dec.R[l]).flatten(0, 1))
        return torch.cat(out)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> NeuronBatch:
        return self.coefficients(trace(self.dec, images, (self.layer,)))

    @torch.no_grad()
    def coefficients(self, t: Trace) -> NeuronBatch:
        """This layer's neurons' coefficients from a forward trace `t` that recorded this layer (one trace can
        serve several layers and neuron slices)."""
        fd = self.dec.fold_dtype
        with torch.autocast(t.w.device.type, enabled=False):
            act = t.acts[self.layer][..., self.neurons].to(fd)
            e = torch.cat([t.reads[l].flatten(1, 2) for l in self.later], 1)   # [B, K, N]
            s = torch.einsum("bki,bin->bkn", e, act)
            first = torch.einsum("bkt,btn->bkn", t.w, act[:, t.pooled])        # [B, channels, n]
            if self.simple:
                direct = first[:, 0].abs() * (self.writes() @ self.dec.A[0]).norm(dim=-1)
            else:
                U = torch.einsum("nw,kwr->knr", self.writes(), self.dec.A)     # [channels, n, r]
                direct = self._through(first.transpose(1, 2)[..., None] * U.permute(1, 0, 2), t.readout).norm(dim=-1)
        return NeuronBatch(s=s, token_weights=e, act=act, direct=direct, readout=t.readout)

    def _through(self, y: torch.Tensor, readout: tr.Readout | None) -> torch.Tensor:
        """[B, M, channels, r] -> [B, M, D]: the channels' second factors, then the readout's per-image steps."""
        pre = self.dec.channels(y)
        if not readout or not readout.steps:
            return pre
        return readout.post(pre)

    @torch.no_grad()
    def effects(self, s: torch.Tensor, neurons: torch.Tensor | slice | None = None,
                readout: tr.Readout | None = None) -> torch.Tensor:
        """[B, n, D] (or [B, len(neurons), D]): the second-order effects from a batch's coefficients; `readout`
        (the batch's, NeuronBatch.readout) is needed where the readout has per-image steps."""
        G = self.G if neurons is None else self.G[:, neurons]
        s = s if neurons is None else s[:, :, neurons]
        return self._combine(s, G, readout)

    @torch.no_grad()
    def token_effects(self, batch: NeuronBatch, neuron: int, directions: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N, D] (or [B, N, K'] projected on `directions` [D, K']): neuron `neuron`'s second-order effect
        split over the tokens it writes at; summed over tokens it is the neuron's effect."""
        coef = batch.token_weights * batch.act[:, None, :, neuron]  # [B, K, N]: the tokens take the neurons' place
        out = self._combine(coef, self.G[:, neuron:neuron + 1].expand(-1, coef.shape[-1], -1), batch.readout)
        return out if directions is None else out @ directions.to(out)

    def _combine(self, s: torch.Tensor, G: torch.Tensor, readout: tr.Readout | None) -> torch.Tensor:
        """sum_jk s[b, jk, m] G[jk, m] B[k], through the readout's steps: [B, K, M] x [K, M, r] -> [B, M, D]."""
        if self.simple:
            return torch.einsum("bkm,kmd->bmd", s, G)
        if readout is None and self.dec.tower.readout_post:
            raise ValueError("this tower's readout has per-image steps: pass the batch's readout")
        B, K, M = s.shape
        J, C = K // self.channels, self.channels
        y = torch.einsum("bjkm,jkmr->bmkr", s.view(B, J, C, M), G.reshape(J, C, M, -1))
        return self._through(y, readout)

    @torch.no_grad()
    def token_map(self, images: torch.Tensor, direction: torch.Tensor, neuron: int = 0) -> torch.Tensor:
        """[B, N]: each token's share of the neuron's effect, projected on a unit `direction` [D] (the neuron's
        principal direction or a text embedding); token 0 is the first token (the class token when there is one)."""
        batch = self(images)
        return self.token_effects(batch, neuron, direction.reshape(-1, 1))[..., 0]

    def grams(self) -> torch.Tensor:
        """[n, K, K]: G_n G_n^T per neuron, so ||effect_n|| = sqrt(s^T Gram_n s) (towers where `simple`)."""
        return torch.einsum("knd,jnd->nkj", self.G, self.G)

    @torch.no_grad()
    def head_grams(self) -> torch.Tensor:
        """[n, J, C, C]: per neuron and later head, the Gram of its C channels' directions G[jk, n] B[k] (before
        the readout's per-image steps); with `head_moments` it gives each later head's energy."""
        J, C = len(self.heads), self.channels
        G = self.G.view(J, C, self.n, -1)
        if self.dec.B is not None:
            G = torch.einsum("jknr,krq->jknq", G, self.dec.B)
        return torch.einsum("jknq,jlnq->njkl", G, G)

    def head_moments(self, s: torch.Tensor) -> torch.Tensor:
        """[n, J, C, C]: sum over the batch of s s^T within each later head's channels."""
        B, K, n = s.shape
        s = s.view(B, K // self.channels, self.channels, n)
        return torch.einsum("bjkn,bjln->njkl", s, s)


def effect_norms(s: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """[B, n]: ||effect_n(img)|| from the coefficients [B, K, n] and the per-neuron Grams [n, K, K]."""
    q = torch.einsum("bkn,nkj,bjn->bn", s, grams, s)
    return q.clamp_min(0).sqrt()


def head_shares(moments: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
    """[n, J]: each later head's share of the per-head energies sum_img ||head j's part of effect_n||^2, from the
    per-head moments and Grams ([n, J, C, C]; cross terms between heads are left out of the attribution, and
    for readouts with per-image steps the energies are measured before those steps)."""
    energy = (moments * grams).sum((-1, -2)).clamp_min(0)
    return energy / energy.sum(-1, keepdim=True).clamp_min(1e-30)


@dataclass
class Directions:
    direction: torch.Tensor    # [n, D] unit: the top right singular vector of the stacked effects
    share: torch.Tensor        # [n] its share of the effects' total energy (sum of squared norms)


def principal_directions(G: torch.Tensor, moments: torch.Tensor, sums: torch.Tensor) -> Directions:
    """From G [K, n, D], the running sum of s s^T [n, K, K] and of s [n, K]: each neuron's principal direction
    over the images (signed so that the mean effect points along it), without the [images, D] matrix."""
    Q, R = torch.linalg.qr(G.permute(1, 2, 0))                      # [n, D, K], [n, K, K]
    return _top(R @ moments @ R.transpose(1, 2), Q, torch.einsum("nk,knd->nd", sums, G))


def dense_directions(moments: torch.Tensor, sums: torch.Tensor) -> Directions:
    """The same from the effects' own moments sum e e^T [n, D, D] and sums [n, D] (readouts with per-image steps)."""
    return _top(moments, None, sums)


def top_eigen(A: torch.Tensor, start: torch.Tensor | None = None, block: int = 8, iters: int = 300,
              tol: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top eigenpair of each symmetric positive semi-definite A [n, D, D]: (values [n], vectors [n, D]).

    A full eigendecomposition costs about 10 D^3 per matrix (0.12 s at D = 768 on 2 CPU cores, minutes for a
    layer's neurons); only the top pair is needed, so a block of `block` vectors (the first `start` [n, D], e.g.
    the mean effect) is iterated, V <- orth(A V), with Rayleigh-Ritz on the block. A pair counts as converged when
    ||A v - lambda v|| <= tol * lambda (default 1e-10 in float64, 1e-5 in float32); matrices that have not
    converged after `iters` get the full eigh."""
    n, D, _ = A.shape
    tol = tol if tol is not None else (1e-10 if A.dtype == torch.float64 else 1e-5)
    if D <= 4 * block:
        vals, vecs = torch.linalg.eigh(A)
        return vals[..., -1], vecs[..., -1]
    g = torch.Generator(device="cpu").manual_seed(0)
    V = torch.randn(D, block, generator=g, dtype=A.dtype).to(A.device).expand(n, -1, -1).clone()
    if start is not None:
        V[..., 0] = start
    V = torch.linalg.qr(V).Q
    lam = torch.zeros(n, dtype=A.dtype, device=A.device)
    vec = V[..., 0]
    done = torch.zeros(n, dtype=torch.bool, device=A.device)
    for _ in range(iters):
        AV = A @ V
        T = V.transpose(1, 2) @ AV
        w, U = torch.linalg.eigh((T + T.transpose(1, 2)) / 2)
        lam, vec = w[..., -1], (V @ U[..., -1:])[..., 0]
        resid = (A @ vec[..., None])[..., 0] - lam[:, None] * vec
        done = resid.norm(dim=-1) <= tol * lam.abs().clamp_min(1e-300)
        if bool(done.all()):
            break
        V = torch.linalg.qr(AV).Q
    if not bool(done.all()):
        rest = ~done
        vals, vecs = torch.linalg.eigh(A[rest])
        lam, vec = lam.clone(), vec.clone()
        lam[rest], vec[rest] = vals[..., -1], vecs[..., -1]
    return lam, vec


def _top(A: torch.Tensor, Q: torch.Tensor | None, mean_effect: torch.Tensor) -> Directions:
    """A: symmetric [n, D, D] (sums of e e^T are symmetric to the bit) or [n, K, K] to be read through Q."""
    if Q is None:
        top_val, top = top_eigen(A, mean_effect)
    else:
        A = (A + A.transpose(1, 2)) / 2
        vals, vecs = torch.linalg.eigh(A)                           # ascending; K x K, small
        top_val, top = vals[..., -1], vecs[..., -1]
    direction = top if Q is None else torch.einsum("ndk,nk->nd", Q, top)
    sign = torch.sign((direction * mean_effect).sum(-1))
    direction = direction * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
    total = torch.diagonal(A, dim1=1, dim2=2).sum(-1)
    share = torch.where(total > 0, top_val / total.clamp_min(1e-30), torch.zeros_like(total))
    return Directions(F.normalize(direction, dim=-1), share.clamp(0, 1))


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
