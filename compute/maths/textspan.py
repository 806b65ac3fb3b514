"""TextSpan (Gandelsman et al.), batched over heads, at each head's true rank.

Per head, with C [N, D] its direct contributions and T [K, D] the text embeddings:
1. project every text onto the span of C's top-r right singular vectors (uncentered);
2. centre C; then, up to m times, pick the text whose projection has the largest
   variance over images, remove that direction from the data and from every text.

Well defined, where the reference is not. A head's contribution is W_O,h (with LayerScale and the
readout folded in) applied to a head_dim vector, so C spans at most head_dim dimensions. Singular
directions past that are round-off noise, and texts projected onto them get noise components that
change the norms used in deflation: the reference's picks then depend on the SVD's arbitrary noise
basis (docs/textspan.md has the measurements). So here

    r = min(rank, numerical rank of C),  numerical rank = #{ s_i > RANK_TOL * s_max },

with RANK_TOL = D * eps(float32), the round-off of a float32 row of width D; and picking stops
early when the best remaining text would explain less than PICK_FLOOR of the head's variance.
Rows stored in float16 (`compute --store-dtype float16`) carry a rounding error E with
||E||_2 <= ||E||_F <= u16 sqrt(D) ||C||_2 (u16 = 2^-11, per-element relative error; ||C||_F <= sqrt(D) s_max),
which moves every singular value by at most that (Weyl), so for them RANK_TOL is also at least
sqrt(D) u16 (5.5e-3 at D = 128): their noise directions never count as rank.
At r <= the true rank and with no early stop this is exactly the reference algorithm.

Sufficient statistics. Everything above needs C only through n, sum(C) and the Gram C^T C
(uncentered right singular vectors = eigenvectors of the Gram; covariance = (Gram - n mu mu^T)/(n-1)),
so heads are streamed chunk by chunk into `Moments` (D x D per head, in float64, whatever the
number of images), and two halves of the images cost no second pass (their moments add up to the
whole). The per-pick cost is K r^2 for all heads at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RANK_TOL_EPS = torch.finfo(torch.float32).eps    # times D: RANK_TOL
UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11}   # of the stored rows: half their machine epsilon
PICK_FLOOR = 1e-3                                # a pick must explain at least this share of the head's variance
STABILITY_K = 5                                  # top picks compared between the two halves
UNSTABLE_BELOW = 0.5                             # a head sharing fewer of its top picks between halves is flagged


@dataclass
class Moments:
    """Streaming sufficient statistics of a batch of heads' rows: count, sum [H, D], Gram [H, D, D] (float64)."""
    n: int
    sum: torch.Tensor
    gram: torch.Tensor

    @classmethod
    def zeros(cls, heads: int, dim: int, device: torch.device | str = "cpu") -> Moments:
        return cls(0, torch.zeros(heads, dim, dtype=torch.float64, device=device),
                   torch.zeros(heads, dim, dim, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, C: torch.Tensor) -> Moments:
        """Moments of [H, N, D] (or [N, D]) rows."""
        if C.ndim == 2:
            C = C[None]
        Cd = C.to(torch.float64)
        return cls(C.shape[1], Cd.sum(1), Cd.transpose(-1, -2) @ Cd)

    def add(self, C: torch.Tensor) -> None:
        """Accumulate [H, n, D] rows (any float dtype; the products run in float64)."""
        Cd = C.to(device=self.sum.device, dtype=torch.float64)
        self.n += C.shape[1]
        self.sum += Cd.sum(1)
        self.gram += Cd.transpose(-1, -2) @ Cd

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.sum + other.sum, self.gram + other.gram)

    def covariance(self) -> torch.Tensor:
        """Unbiased covariance [H, D, D]."""
        mu = self.sum / self.n
        return (self.gram - self.n * mu[:, :, None] * mu[:, None, :]) / (self.n - 1)


@dataclass
class TextSpanResult:
    """Per head (leading dim H). Heads stop at different counts: picks are -1 past `n_picks`."""
    picks: torch.Tensor                  # [H, m] text indices, in pick order
    variance_explained: torch.Tensor     # [H, m] fraction of the head's total variance (0 past n_picks)
    directions: torch.Tensor             # [H, m, D] unit directions removed, in embedding space (0 past n_picks)
    total_variance: torch.Tensor         # [H]
    rank: torch.Tensor                   # [H] the rank used: min(requested, numerical rank)
    n_picks: torch.Tensor                # [H] picks made before the rank or the variance ran out
    basis: torch.Tensor                  # [H, R, D] the span (rows past a head's rank are 0)
    span_covariance: torch.Tensor        # [H, R, R] the covariance inside the span, before any pick

    @property
    def cumulative(self) -> torch.Tensor:
        return self.variance_explained.cumsum(-1)

    def head_picks(self, h: int) -> list[int]:
        return self.picks[h, : int(self.n_picks[h])].tolist()


def rank_tolerance(dim: int, store_dtype: str = "float32") -> float:
    """Relative singular-value tolerance for width-`dim` rows stored in `store_dtype`."""
    return max(dim * RANK_TOL_EPS, dim ** 0.5 * UNIT_ROUNDOFF[store_dtype])


def span_basis(gram: torch.Tensor, rank: int, store_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """[H, D, D] uncentered Gram -> (V [H, R, D] top right singular vectors, zero rows past each head's rank;
    ranks [H]), R = the largest rank used."""
    evals, evecs = torch.linalg.eigh(gram)                       # ascending
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    sv = evals.clamp_min(0).sqrt()
    tol = rank_tolerance(gram.shape[-1], store_dtype) * sv[:, :1]
    ranks = (sv > tol).sum(-1).clamp(max=rank)
    R = max(int(ranks.max()), 1)
    keep = torch.arange(R, device=gram.device)[None, :] < ranks[:, None]    # [H, R]
    V = evecs[..., :R].transpose(-1, -2) * keep[..., None]
    return V, ranks


def greedy_picks(t: torch.Tensor, cov: torch.Tensor, total: torch.Tensor, ranks: torch.Tensor, m: int,
                 floor: float = PICK_FLOOR) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """TextSpan's loop on span coordinates. t: [H, K, R] texts, cov: [H, R, R], total: [H] variance to divide by,
    ranks: [H]. Returns (picks [H, m] with -1 once a head stops, explained [H, m], unit directions: m x [H, R])."""
    H = t.shape[0]
    picks = torch.full((H, m), -1, dtype=torch.long, device=t.device)
    explained = torch.zeros(H, m, dtype=t.dtype, device=t.device)
    units = []
    active = ranks > 0
    h_idx = torch.arange(H, device=t.device)
    for k in range(m):
        active &= ranks > k
        var = ((t @ cov) * t).sum(-1)                             # [H, K] variance of each text's projection
        j = var.argmax(-1)
        u = t[h_idx, j]
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)    # [H, R]
        ev = torch.einsum("hr,hrs,hs->h", u, cov, u) / total
        active &= ev >= floor
        if not active.any():
            break
        u = u * active[:, None].to(u.dtype)                       # finished heads deflate by nothing
        picks[:, k] = torch.where(active, j, -1)
        explained[:, k] = ev * active
        units.append(u)
        # deflate: remove u from the data (covariance) and from every text
        cu = torch.einsum("hrs,hs->hr", cov, u)
        ucu = (u * cu).sum(-1, keepdim=True)
        cov = cov - u[:, :, None] * cu[:, None, :] - cu[:, :, None] * u[:, None, :] + ucu[:, :, None] * u[:, :, None] * u[:, None, :]
        t = t - (t @ u[:, :, None]) * u[:, None, :]
    return picks, explained, units


@torch.no_grad()
def textspan_from_moments(moments: Moments, T: torch.Tensor, m: int = 20, rank: int = 80,
                          floor: float = PICK_FLOOR, store_dtype: str = "float32") -> TextSpanResult:
    """TextSpan for a batch of heads given their moments; T: [K, D] L2-normalised texts."""
    V, ranks = span_basis(moments.gram, rank, store_dtype)        # [H, R, D]
    H, R, D = V.shape
    cov_full = moments.covariance()
    total = cov_full.diagonal(dim1=-2, dim2=-1).sum(-1)           # trace of the covariance
    cov = V @ cov_full @ V.transpose(-1, -2)                      # [H, R, R]: covariance inside the span
    t = T.to(device=V.device, dtype=torch.float64)[None] @ V.transpose(-1, -2)    # [H, K, R] texts in span coordinates
    m = min(m, T.shape[0], R)
    picks, explained, units = greedy_picks(t, cov, total, ranks, m, floor)
    dirs = torch.zeros(H, m, D, dtype=torch.float64, device=V.device)
    for k, u in enumerate(units):
        dirs[:, k] = torch.einsum("hr,hrd->hd", u, V)
    n_picks = (picks >= 0).sum(-1)
    return TextSpanResult(picks, explained, dirs, total, ranks, n_picks, V, cov)


def textspan(C: torch.Tensor, T: torch.Tensor, m: int = 20, rank: int = 80, floor: float = PICK_FLOOR) -> TextSpanResult:
    """TextSpan for in-memory contributions C: [H, N, D] (or [N, D])."""
    return textspan_from_moments(Moments.of(C), T, m=m, rank=rank, floor=floor)


def pick_overlap(a: list[int], b: list[int], k: int = STABILITY_K) -> float:
    """Share of the top-k picks that two runs have in common (order ignored); 1.0 when neither picked anything."""
    k = min(k, max(len(a), len(b)))
    if k == 0:
        return 1.0
    return len(set(a[:k]) & set(b[:k])) / k


def half_of(image_ids: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random split of images into halves by id (bool: True = second half)."""
    x = image_ids.to(torch.int64) * 0x9E3779B1 + 0x7F4A7C15
    x = (x ^ (x >> 16)) * 0x45D9F3B
    return ((x ^ (x >> 16)) & 1).bool()


def reference_textspan(C, T, m: int, rank: int):
    """The reference algorithm, one head, as written in DESIGN section 3 (numpy, float64); for tests and benchmarks."""
    C = np.asarray(C, np.float64)
    T = np.asarray(T, np.float64)
    _, _, vh = np.linalg.svd(C, full_matrices=False)
    vh = vh[:rank]
    T = T @ vh.T @ vh
    C0 = C - C.mean(0, keepdims=True)
    total = (C0 ** 2).sum() / (len(C) - 1)
    picks, explained = [], []
    for _ in range(m):
        S = C0 @ T.T
        j = int(np.argmax(S.std(0, ddof=1)))
        tj = T[j] / np.linalg.norm(T[j])
        proj = C0 @ tj
        explained.append(float((proj ** 2).sum() / (len(C) - 1) / total))
        C0 = C0 - np.outer(proj, tj)
        T = T - np.outer(T @ tj, tj)
        picks.append(j)
    return picks, explained
