"""`clip-atlas compute`: images -> decomposition -> Parquet store, resumable and rank-parallel."""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from tqdm import tqdm

from compute import checks
from compute.errors import AtlasError
from compute.images import find_images
from compute.maths.decompose import Decomposer, component_layout, resolve_layers
from compute.models import LoadedModel, load_model
from compute.runtime import Distributed, decoded_batches, default_workers, pick_device
from compute.store.layout import STORE_DTYPES, Chunk, RunStore
from compute.store.writer import ChunkWriter

#: Memory for one chunk's rows; the chunk is also the unit a resumed run may redo.
CHUNK_BYTES = 64 * 2**20


@dataclass
class ComputeConfig:
    model: str
    images: str
    out: str
    layers: str = "last4"
    batch_size: int = 32
    device: str = "auto"
    limit: int | None = None
    labels: str | None = None
    chunk_size: int | None = None
    precision: str = "fp32"
    store_dtype: str = "float32"
    workers: int | None = None   # default_workers()


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("clip-atlas", "torch", "open_clip_torch", "pyarrow", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_compute(cfg: ComputeConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """Compute (or resume) a run; returns its final manifest."""
    checks.at_least(1, batch_size=cfg.batch_size, limit=cfg.limit, chunk_size=cfg.chunk_size, workers=cfg.workers)
    root = Path(cfg.images)
    refs = find_images(root, cfg.labels, cfg.limit)
    device = pick_device(cfg.device)
    checks.one_of("store_dtype", cfg.store_dtype, STORE_DTYPES)
    if cfg.precision != "fp32" and device.type != "cuda":
        raise AtlasError("bf16/fp16 autocast needs a GPU; use --precision fp32 on CPU")
    if loaded is None:
        loaded = load_model(cfg.model, device)
        loaded.drop_text_tower()   # compute only needs the vision tower
    info = loaded.info
    head_layers = resolve_layers(cfg.layers, info.layers)
    dist = Distributed(device)
    store = RunStore(cfg.out)
    fields = {"model": info.spec, "architecture": info.architecture, "tag": info.tag,
              "random_weights": info.random_weights, "layers": info.layers, "heads": info.heads,
              "width": info.width, "embed_dim": info.embed_dim, "patch_grid": list(info.grid),
              "image_size": list(info.image_size), "pool_type": info.pool_type, "family": info.family,
              "prefix_tokens": info.prefix_tokens, "parameters": info.parameters, "training": info.training,
              "head_layers": head_layers,
              "images_root": str(root.resolve()), "image_limit": cfg.limit, "versions": versions(),
              "component_kinds": ["embed", "attn", "attn_bias", "mlp", "ln_bias"], "store_dtype": cfg.store_dtype}
    if dist.rank == 0:
        store.start(fields, identity=("model", "architecture", "tag", "head_layers", "images_root", "image_limit",
                                      "store_dtype"))
        store.remove_orphans()
    dist.barrier()
    done = store.done_paths()
    todo = [r for r in refs if r.path not in done]
    mine = todo[dist.rank::dist.world]
    per_image = 4 * info.embed_dim * (1 + 2 + 3 * info.layers + len(head_layers) * info.heads)
    chunk_size = cfg.chunk_size or max(cfg.batch_size, CHUNK_BYTES // per_image)
    decomposer = Decomposer(loaded.model, head_layers=head_layers)
    kinds, comp_layers = component_layout(info.layers)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16) \
        if cfg.precision in ("bf16", "fp16") else torch.autocast("cpu", enabled=False)

    chunk = Chunk()
    workers = cfg.workers or default_workers()
    # the bar closes (its line ends) before any error is printed; chunks go to disk in the background while the
    # next batches are decomposed (a GPU outruns the writer)
    with tqdm(total=len(mine), unit="img", desc=f"compute[{dist.rank}]" if dist.active else "compute",
              disable=not progress, position=dist.rank, dynamic_ncols=True) as bar, \
            ChunkWriter(store, head_layers, dist.rank, cfg.store_dtype, threads=workers) as writer:
        try:
            draft = max(info.image_size) * 2
            for batch, pixels, skipped in decoded_batches(mine, root, loaded.preprocess, cfg.batch_size, workers, draft):
                chunk.skipped += skipped
                if pixels is not None:
                    with autocast:
                        d = decomposer(pixels.to(device))
                    chunk.image_ids += [r.image_id for r in batch]
                    chunk.paths += [r.path for r in batch]
                    chunk.labels += [r.label for r in batch]
                    chunk.embeddings.append(d.embedding.float().cpu().numpy())
                    chunk.components.append((d.components().float().cpu().numpy(), kinds, comp_layers))
                    chunk.heads.append(d.heads.float().cpu().numpy())
                    chunk.pool_mlp_share += ([None] * len(batch) if d.pool_mlp is None
                                             else (d.pool_mlp * d.embedding).sum(-1).tolist())
                bar.update(len(batch) + len(skipped))
                if len(chunk) + len(chunk.skipped) >= chunk_size:
                    writer.submit(chunk)
                    chunk = Chunk()
        except KeyboardInterrupt:
            # what is decoded and decomposed is complete: keep it (after the chunk in flight), then stop
            if len(chunk) or chunk.skipped:
                writer.submit(chunk)
            raise                   # leaving the writer waits for it; the CLI turns Ctrl-C into its exit status
        if len(chunk) or chunk.skipped:
            writer.submit(chunk)
    dist.barrier()
    markers = store.usable_markers()   # on every rank, so none waits at the barrier below for a rank that stopped
    if dist.rank == 0:
        store.finish(markers)
    dist.barrier()
    dist.close()
    return {**store.manifest(), "rank": dist.rank}
