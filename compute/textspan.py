"""TextSpan (Gandelsman et al.), batched over heads.

Per head, with C [N, D] its direct contributions and T [K, D] the text embeddings:
1. project every text onto the span of C's top-r right singular vectors (uncentered);
2. centre C; then m times: pick the text whose projection has the largest
   variance over images, remove that direction from the data and from every text.

The picks only depend on the data through its covariance inside the r-dim span
(every text lies in it, and so does every removed direction), so all heads run
as one batch of r x r problems: the per-pick cost is K r^2, not N K D.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextSpanResult:
    """Per head (leading dim H): picks and what each explains."""
    picks: torch.Tensor                  # [H, m] text indices, in pick order
    variance_explained: torch.Tensor     # [H, m] fraction of the head's total variance
    directions: torch.Tensor             # [H, m, D] unit directions removed, in embedding space
    total_variance: torch.Tensor         # [H]

    @property
    def cumulative(self) -> torch.Tensor:
        return self.variance_explained.cumsum(-1)


def top_right_singular(C: torch.Tensor, rank: int) -> torch.Tensor:
    """[H, N, D] -> [H, r, D]: top-r right singular vectors, from the D x D Gram matrix (N >> D)."""
    # in float64: squaring C squares its condition number, and float32 would blur the trailing
    # singular directions (often a near-degenerate noise floor) enough to flip near-tied picks
    Cd = C.to(torch.float64)
    evals, evecs = torch.linalg.eigh(Cd.transpose(-1, -2) @ Cd)   # ascending
    r = min(rank, C.shape[-1], C.shape[-2])
    return evecs[..., -r:].flip(-1).transpose(-1, -2)


@torch.no_grad()
def textspan(C: torch.Tensor, T: torch.Tensor, m: int = 20, rank: int = 80,
             dtype: torch.dtype = torch.float32) -> TextSpanResult:
    """Run TextSpan for a batch of heads. C: [H, N, D] (or [N, D]); T: [K, D] L2-normalised texts."""
    if C.ndim == 2:
        C = C[None]
    C, T = C.to(dtype), T.to(device=C.device, dtype=dtype)
    H, N, D = C.shape
    # the N-sized products run in `dtype`; everything after them is r-dimensional and runs in float64,
    # so near-tied picks do not flip with float32 rounding
    V = top_right_singular(C, rank)                            # [H, r, D], float64
    # past r picks the span is used up and further picks would be numerical noise
    m = min(m, T.shape[0], V.shape[1])
    t = T.to(torch.float64)[None] @ V.transpose(-1, -2)        # [H, K, r]  texts in span coordinates
    C0 = C - C.mean(1, keepdim=True)
    total = (C0 * C0).sum((1, 2)).to(torch.float64) / (N - 1)  # trace of the covariance
    c = (C0 @ V.to(dtype).transpose(-1, -2)).to(torch.float64)  # [H, N, r]
    cov = c.transpose(-1, -2) @ c / (N - 1)                    # [H, r, r]
    picks, explained, dirs = [], [], []
    h_idx = torch.arange(H, device=C.device)
    for _ in range(m):
        var = ((t @ cov) * t).sum(-1)                          # [H, K] variance of each text's projection
        j = var.argmax(-1)                                     # [H]
        u = t[h_idx, j]
        u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-300)    # [H, r]
        explained.append(torch.einsum("hr,hrs,hs->h", u, cov, u) / total)
        picks.append(j)
        dirs.append(torch.einsum("hr,hrd->hd", u, V))
        # deflate: remove u from the data (covariance) and from every text
        cu = torch.einsum("hrs,hs->hr", cov, u)
        ucu = (u * cu).sum(-1, keepdim=True)
        cov = cov - u[:, :, None] * cu[:, None, :] - cu[:, :, None] * u[:, None, :] + ucu[:, :, None] * u[:, :, None] * u[:, None, :]
        t = t - (t @ u[:, :, None]) * u[:, None, :]
    return TextSpanResult(torch.stack(picks, 1), torch.stack(explained, 1).to(dtype), torch.stack(dirs, 1).to(dtype),
                          total.to(dtype))


def reference_textspan(C, T, m: int, rank: int):
    """The reference algorithm, one head, as written in DESIGN section 3 (numpy, float64); for tests and benchmarks."""
    import numpy as np
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


def run_textspan(run: str, pool: str, m: int = 20, rank: int = 80, layers: str | None = None,
                 precision: str = "float32", device: str = "auto", heads_per_batch: int = 16,
                 progress: bool = True) -> dict:
    """`clip-atlas textspan`: writes RUN/texts.parquet and RUN/textspan.parquet."""
    import numpy as np
    import pyarrow as pa
    from tqdm import tqdm

    from .decompose import resolve_layers
    from .errors import AtlasError
    from .heads import read_heads
    from .job import pick_device
    from .models import load_model
    from .store import RunStore, vectors
    from .texts import load_pool

    store = RunStore(run)
    man = store.manifest()
    if man.get("status") != "complete":
        raise AtlasError(f"{run} is {man.get('status')}; finish it with `clip-atlas compute` first")
    if m < 1 or rank < 1:
        raise AtlasError("--m and --rank must be positive")
    stored = man["head_layers"]
    chosen = stored if layers is None else resolve_layers(layers, man["layers"])
    missing = sorted(set(chosen) - set(stored))
    if missing:
        raise AtlasError(f"layers {missing} were not stored in {run} (stored: {stored})")
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(precision)
    if dtype is None:
        raise AtlasError("--precision is float32 or float64")
    texts = load_pool(pool)
    dev = pick_device(device)
    loaded = load_model(man["model"], dev)
    T = loaded.encode_texts(texts.texts, progress=progress)
    store.write_derived("texts", pa.table({
        "text_id": pa.array(range(len(texts.texts)), pa.int32()), "text": texts.texts,
        "tags": pa.array(texts.tags, pa.list_(pa.string())), "embedding": vectors(T.cpu().numpy())}))
    pairs = [(l, h) for l in chosen for h in range(man["heads"])]
    cols: dict[str, list] = {k: [] for k in ("layer", "head", "rank", "text_id", "text", "variance_explained",
                                             "cumulative_variance")}
    dirs = []
    bar = tqdm(total=len(pairs), desc="textspan", unit="head", disable=not progress)
    for i in range(0, len(pairs), heads_per_batch):
        group = pairs[i:i + heads_per_batch]
        _, C = read_heads(store, group)
        res = textspan(torch.from_numpy(C).to(dev), T, m=m, rank=rank, dtype=dtype)
        picks, ve, cum = res.picks.cpu().numpy(), res.variance_explained.cpu().numpy(), res.cumulative.cpu().numpy()
        for g, (layer, head) in enumerate(group):
            for r, j in enumerate(picks[g]):
                for k, v in zip(cols, (layer, head, r, int(j), texts.texts[j], float(ve[g, r]), float(cum[g, r]))):
                    cols[k].append(v)
        dirs.append(res.directions.float().cpu().numpy().reshape(-1, res.directions.shape[-1]))
        bar.update(len(group))
    bar.close()
    table = pa.table({
        "layer": pa.array(cols["layer"], pa.int16()), "head": pa.array(cols["head"], pa.int16()),
        "rank": pa.array(cols["rank"], pa.int16()), "text_id": pa.array(cols["text_id"], pa.int32()),
        "text": cols["text"], "variance_explained": pa.array(cols["variance_explained"], pa.float32()),
        "cumulative_variance": pa.array(cols["cumulative_variance"], pa.float32()),
        "direction": vectors(np.concatenate(dirs))})
    store.write_derived("textspan", table)
    return store.update_manifest(textspan={"pool": pool, "texts": len(texts.texts), "m": m, "rank": rank,
                                           "layers": chosen, "precision": precision})
