"""`clip-atlas neurons RUN`: second-order effects of MLP neurons over a run's images -> RUN/neurons/layer=L.parquet.

Per neuron, streamed over the images with memory independent of their number (maths/neurons.py):
the mean and max second-order effect norm, the mean direct (first-order) norm for comparison, the top
principal direction of its effects and the share of their energy it carries, the images where the
effect is largest (a running top-k), the later head most of the effect flows through, and a sparse
text description of the direction: non-negative OMP over the run's description pool, centred (the
pool mean, which every CLIP text shares, is subtracted so that picks say what is specific) and
L2-normalised again.

The folded readout G of a layer is [later heads x channels, neurons, r]; where the readout has per-image
steps (an attention pool's MLP) each neuron also keeps the D x D moments of its explicit effects. Layers (or
neuron slices of a large layer) are grouped into passes over the images so that the state held at once stays
under STATE_BUDGET; one forward pass per batch serves every layer and slice of a pass.
A layer's table is written when it is complete, so an interrupted job resumes at the next layer.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from compute import checks
from compute.errors import AtlasError
from compute.images import ImageRef
from compute.jobs.textspan import default_pool
from compute.maths.decompose import resolve_layers
from compute.maths.neurons import (SecondOrder, default_neuron_layers, dense_directions, effect_norms, head_shares,
                                   neuron_unsupported_reason, principal_directions, sparse_texts, state_bytes, trace)
from compute.models import load_model
from compute.runtime import decoded_batches, default_workers, pick_device
from compute.store.layout import RunStore, vectors, write_table_atomic
from compute.store.readers import read_images, vector_column
from compute.texts import load_pool

STATE_BUDGET = 768 * 2**20  # bytes of per-neuron state (folded readout, moments) held at once
EFFECT_CHUNK = 64           # neurons whose explicit effects [batch, neurons, D] are formed at once
TOP_K = 8                   # top images kept per neuron
DEFAULT_TEXTS = 5           # texts in a neuron's description


@dataclass
class _Slice:
    """Running statistics of one slice of a layer's neurons."""
    layer: int
    neurons: slice
    so: object = None
    count: int = 0
    sum_norm: torch.Tensor | None = None
    max_norm: torch.Tensor | None = None
    sum_direct: torch.Tensor | None = None
    moments: torch.Tensor | None = None        # [n, K, K] (simple readout) or [n, D, D] (effects formed)
    sums: torch.Tensor | None = None           # [n, K] or [n, D]
    blocks: torch.Tensor | None = None         # [n, J, C, C] per later head
    top_vals: torch.Tensor | None = None       # [n, k]
    top_ids: torch.Tensor | None = None
    grams: torch.Tensor | None = None

    def start(self, model, k: int, decomposer=None) -> None:
        self.so = so = SecondOrder(model, self.layer, self.neurons, decomposer)
        K, n = so.G.shape[:2]
        J, C = len(so.heads), so.channels
        fd, dev = so.G.dtype, so.G.device
        width = K if so.simple else so.dec.tower.embed_dim
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=dev)   # noqa: E731
        self.sum_norm, self.max_norm, self.sum_direct = z(n), z(n), z(n)
        self.sums, self.blocks = z(n, width), z(n, J, C, C)
        # D x D per neuron is kept in the model's own precision (float32 halves the memory and the passes)
        self.moments = z(n, width, width) if so.simple else torch.zeros(n, width, width, dtype=fd, device=dev)
        self.top_vals = torch.full((n, k), -1.0, dtype=fd, device=dev)
        self.top_ids = torch.full((n, k), -1, dtype=torch.long, device=dev)
        self.grams = so.grams() if so.simple else None

    @torch.no_grad()
    def add(self, tr, ids: torch.Tensor) -> None:
        """Fold in one batch, from a forward `tr`ace that recorded this slice's layer."""
        b = self.so.coefficients(tr)
        s = b.s.double()
        if self.so.simple:
            norms = effect_norms(b.s, self.grams)                   # [B, n]
            self.moments += torch.einsum("bkn,bjn->nkj", s, s)
            self.sums += s.sum(0).T
        else:                                                       # the effects themselves, a few neurons at a time
            norms = torch.empty(b.s.shape[0], self.so.n, dtype=b.s.dtype, device=b.s.device)
            for i in range(0, self.so.n, EFFECT_CHUNK):
                part = slice(i, min(i + EFFECT_CHUNK, self.so.n))
                eff = self.so.effects(b.s, part, b.readout)          # [B, chunk, D]
                norms[:, part] = eff.norm(dim=-1)
                eff = eff.to(self.moments.dtype).transpose(0, 1)    # [chunk, B, D]
                self.moments[part].baddbmm_(eff.transpose(1, 2), eff)   # in place: no [chunk, D, D] temporary
                self.sums[part] += eff.sum(1).double()
        self.blocks += self.so.head_moments(s)
        self.count += len(ids)
        self.sum_norm += norms.sum(0).double()
        self.max_norm = torch.maximum(self.max_norm, norms.max(0).values.double())
        self.sum_direct += b.direct.sum(0).double()
        vals = torch.cat([self.top_vals, norms.T.to(self.top_vals)], 1)
        cand = torch.cat([self.top_ids, ids.to(self.top_ids.device).expand(norms.shape[1], -1)], 1)
        self.top_vals, pos = vals.topk(self.top_vals.shape[1], dim=1)
        self.top_ids = cand.gather(1, pos)

    @torch.no_grad()
    def finish(self, texts: np.ndarray, n_texts: int) -> dict:
        so = self.so
        d = (principal_directions(so.G.double(), self.moments, self.sums) if so.simple
             else dense_directions(self.moments, self.sums.to(self.moments.dtype)))
        out = {"direction": d.direction.float().cpu().numpy(), "share": d.share.float().cpu().numpy(),
               "mean": (self.sum_norm / max(self.count, 1)).float().cpu().numpy(),
               "max": self.max_norm.float().cpu().numpy(),
               "direct": (self.sum_direct / max(self.count, 1)).float().cpu().numpy(),
               "top_ids": self.top_ids.cpu().numpy(), "top_vals": self.top_vals.float().cpu().numpy()}
        share = head_shares(self.blocks, so.head_grams().double())
        main = share.argmax(-1)
        out["main_head"] = [so.heads[int(j)] for j in main.tolist()]
        out["main_share"] = share.gather(1, main[:, None])[:, 0].float().cpu().numpy()
        idx, coef, explained = sparse_texts(d.direction.double().cpu(), torch.from_numpy(texts).double(), n_texts)
        out.update(text_idx=idx.numpy(), text_coef=coef.float().numpy(), text_share=explained.float().numpy())
        return out


def centred_pool(T: np.ndarray) -> np.ndarray:
    """Text embeddings minus the pool mean, L2-normalised again."""
    C = T - T.mean(0, keepdims=True)
    return C / np.maximum(np.linalg.norm(C, axis=1, keepdims=True), 1e-12)


def plan_passes(slices: list[tuple[int, slice, int]], budget: int = STATE_BUDGET) -> list[list[tuple[int, slice]]]:
    """Group (layer, neurons, bytes of state) into passes over the images whose state fits the budget together."""
    passes: list[list[tuple[int, slice]]] = []
    used = budget + 1
    for layer, sl, nbytes in slices:
        if used + nbytes > budget:
            passes.append([])
            used = 0
        passes[-1].append((layer, sl))
        used += nbytes
    return passes


def layer_slices(n_neurons: int, per_neuron: int, budget: int = STATE_BUDGET) -> list[slice]:
    """Neuron slices of one layer whose state (`per_neuron` bytes each) fits the budget."""
    per = max(1, budget // per_neuron)
    return [slice(i, min(i + per, n_neurons)) for i in range(0, n_neurons, per)]


def neurons_unsupported(run: str) -> str | None:
    """Why the run's model has no neuron effects (its tower's MLPs are not yet traced for them), or None."""
    man = RunStore(run).require_complete()
    return neuron_unsupported_reason(load_model(man["model"], "cpu").model)


def run_neurons(run: str, layers: str | None = None, images: int | None = None, texts: int = DEFAULT_TEXTS,
                top_k: int = TOP_K, batch_size: int = 32, device: str = "auto", workers: int | None = None,
                progress: bool = True, loaded=None, memory_gib: float | None = None) -> dict:
    """Writes RUN/neurons/layer=L.parquet for each chosen MLP layer; returns the updated manifest. `memory_gib`:
    the per-neuron state held at once (STATE_BUDGET by default); the job makes as many passes as that needs."""

    store = RunStore(run)
    man = store.require_complete()
    checks.at_least(1, images=images, texts=texts, top_k=top_k, batch_size=batch_size)
    n_layers = man["layers"]
    chosen = default_neuron_layers(n_layers) if layers is None else resolve_layers(layers, n_layers)
    if not chosen:
        raise AtlasError("no MLP layers chosen")
    if n_layers - 1 in chosen:
        raise AtlasError(f"layer {n_layers - 1} is the last: its neurons have no later attention, so no second-order "
                         f"effect (use 0-{n_layers - 2})")
    dev = pick_device(device)
    loaded = loaded or load_model(man["model"], dev)
    reason = neuron_unsupported_reason(loaded.model)
    if reason:
        raise AtlasError(f"cannot compute neuron effects for {man['model']}: {reason}")
    pool_texts, pool, pool_name = _pool(store, man, loaded, progress)
    loaded.drop_text_tower()

    table = read_images(store, columns=["image_id", "path"])
    ids_all, paths = table.column("image_id").to_numpy(), table.column("path").to_pylist()
    if images is not None:
        ids_all, paths = ids_all[:images], paths[:images]      # image_ids are hashes: the first N are a fair sample
    refs = [ImageRef(int(i), p, None) for i, p in zip(ids_all, paths)]
    settings = {"images": len(refs), "texts": texts, "top_k": top_k, "pool": pool_name}
    before = man.get("neurons") or {}
    done = [l for l in before.get("layers", []) if before.get("settings") == settings and store.neuron_path(l).is_file()]
    todo = [l for l in chosen if l not in done]
    D = man["embed_dim"]
    dec = loaded.decomposer()
    n_neurons = dec.tower.mlp_out_weight(0).shape[1]
    budget = int(memory_gib * 2**30) if memory_gib is not None else STATE_BUDGET
    plan = plan_passes([(l, sl, state_bytes(dec, l) * (sl.stop - sl.start)) for l in todo
                        for sl in layer_slices(n_neurons, state_bytes(dec, l), budget)], budget)
    root = Path(man["images_root"])
    workers = workers or default_workers()
    draft = max(man["image_size"]) * 2
    T = centred_pool(pool)
    results: dict[int, list[dict]] = {}
    started = time.time()
    for p, group in enumerate(plan):
        slices = [_Slice(l, sl) for l, sl in group]
        for s in slices:
            s.start(loaded.model, top_k, dec)
        recorded = tuple(sorted({s.layer for s in slices}))
        desc = f"neurons L{','.join(str(l) for l in sorted({s.layer for s in slices}))}"
        bar = tqdm(total=len(refs), desc=desc + (f" pass {p + 1}/{len(plan)}" if len(plan) > 1 else ""), unit="img",
                   disable=not progress, dynamic_ncols=True)
        skipped = 0
        for batch, pixels, bad in decoded_batches(refs, root, loaded.preprocess, batch_size, workers, draft):
            skipped += len(bad)
            if pixels is not None:
                ids = torch.tensor([r.image_id for r in batch])
                tr = trace(dec, pixels.to(dev), recorded)         # one forward serves every slice of the pass
                for s in slices:
                    s.add(tr, ids)
            bar.update(len(batch) + len(bad))
        bar.close()
        if not slices[0].count:
            raise AtlasError(f"none of the {len(refs)} images of {run} could be read from {root}")
        for s in slices:
            results.setdefault(s.layer, []).append(s.finish(T, texts))
            s.so = s.grams = s.moments = s.blocks = None
            if sum(r["mean"].shape[0] for r in results[s.layer]) == n_neurons:
                _write_layer(store, s.layer, results.pop(s.layer), s.count, pool_texts, D)
                done = sorted(set(done) | {s.layer})
                store.update_manifest(neurons={"settings": settings, "layers": done, "skipped": skipped, "passes": len(plan),
                                               "seconds": round(time.time() - started, 1)})
    return store.manifest()


def _pool(store: RunStore, man: dict, loaded, progress: bool) -> tuple[list[str], np.ndarray, str]:
    """(texts, embeddings, pool name): the run's description pool (texts.parquet, written by `clip-atlas textspan`),
    else the default pool for the model, encoded now."""
    path = store.table_path("texts")
    if path.is_file():
        t = pq.read_table(path, columns=["text", "embedding"])
        return t.column("text").to_pylist(), vector_column(t, "embedding"), man.get("textspan", {}).get("pool", "run")
    name = default_pool(man.get("architecture", ""))
    pool = load_pool(name)
    return pool.texts, loaded.encode_texts(pool.texts, progress=progress).float().cpu().numpy(), name


def _write_layer(store: RunStore, layer: int, parts: list[dict], count: int, texts: list[str], D: int) -> None:
    cat = {k: (np.concatenate([p[k] for p in parts]) if k != "main_head" else sum((p[k] for p in parts), []))
           for k in parts[0]}
    n = len(cat["mean"])
    top_ids = [[int(i) for i in row if i >= 0] for row in cat["top_ids"]]
    top_vals = [[float(v) for v, i in zip(vr, ir) if i >= 0] for vr, ir in zip(cat["top_vals"], cat["top_ids"])]
    tid = [[int(j) for j in row if j >= 0] for row in cat["text_idx"]]
    tw = [[float(w) for w, j in zip(wr, jr) if j >= 0] for wr, jr in zip(cat["text_coef"], cat["text_idx"])]
    ttext = [[texts[j] for j in row] for row in tid]
    tshare = cat["text_share"]
    write_table_atomic(pa.table({
        "layer": pa.array([layer] * n, pa.int16()), "neuron": pa.array(range(n), pa.int32()),
        "images": pa.array([count] * n, pa.int32()),
        "mean_norm": pa.array(cat["mean"], pa.float32()), "max_norm": pa.array(cat["max"], pa.float32()),
        "direct_mean_norm": pa.array(cat["direct"], pa.float32()),
        "direction": vectors(cat["direction"].reshape(n, D)), "direction_share": pa.array(cat["share"], pa.float32()),
        "text_ids": pa.array(tid, pa.list_(pa.int32())), "texts": pa.array(ttext, pa.list_(pa.string())),
        "text_weights": pa.array(tw, pa.list_(pa.float32())), "text_share": pa.array(tshare, pa.float32()),
        "top_image_ids": pa.array(top_ids, pa.list_(pa.int64())), "top_norms": pa.array(top_vals, pa.list_(pa.float32())),
        "main_head_layer": pa.array([l for l, _ in cat["main_head"]], pa.int16()),
        "main_head": pa.array([h for _, h in cat["main_head"]], pa.int16()),
        "main_head_share": pa.array(cat["main_share"], pa.float32())}), store.neuron_path(layer))
