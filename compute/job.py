"""`clip-atlas compute`: images -> decomposition -> Parquet store, resumable and rank-parallel."""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from .maths.decompose import Decomposer, Decomposition, resolve_layers
from .errors import AtlasError
from .images import BadImage, ImageRef, find_images, load_image
from .models import LoadedModel, load_model
from .store import Chunk, RunStore

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


def local_rank() -> tuple[int, int]:
    """(this process's rank on its node, processes on the node) under torchrun; (0, 1) otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def pick_device(name: str) -> torch.device:
    """'auto' -> this rank's GPU (LOCAL_RANK under torchrun) or the CPU; 'cuda' alone also means this rank's GPU,
    so ranks on one node never share a device. The chosen GPU becomes the current one (nccl needs that)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise AtlasError(f"unknown device {name!r}") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise AtlasError("--device cuda requested but no GPU is available")
    if dev.index is None:
        rank, per_node = local_rank()
        count = torch.cuda.device_count()
        if per_node > count:
            raise AtlasError(f"{per_node} processes on this node but {count} GPUs: use --nproc-per-node {count} or fewer")
        dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    return dev


def default_workers() -> int:
    """Image decoding threads: the cores this process may use, shared by the ranks on its node."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:      # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // local_rank()[1])


class Distributed:
    """Rank and world size under torchrun (or one process); gloo on CPU, nccl on GPU."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def component_layout(n_layers: int) -> tuple[list[str], list[int | None]]:
    kinds: list[str] = ["embed"]
    layers: list[int | None] = [None]
    for layer in range(n_layers):
        kinds += ["attn", "attn_bias", "mlp"]
        layers += [layer] * 3
    return kinds + ["ln_bias"], layers + [None]


def stack_components(d: Decomposition) -> np.ndarray:
    """[B, K, D] in the order of `component_layout`."""
    per_layer = torch.stack([d.attn, d.attn_bias, d.mlp], 2).flatten(1, 2)   # [B, 3L, D]
    return torch.cat([d.embed[:, None], per_layer, d.ln_bias[:, None]], 1).float().cpu().numpy()


def decoded_batches(refs: list[ImageRef], root: Path, preprocess, batch_size: int, workers: int,
                    draft: int) -> Iterator[tuple[list[ImageRef], torch.Tensor | None, list[dict]]]:
    """Batches of (refs, pixels, skipped), decoded by a thread pool one batch ahead."""
    def decode(ref: ImageRef):
        try:
            return preprocess(load_image(root / ref.path, draft_size=draft)), None
        except BadImage as e:
            return None, {"path": ref.path, "reason": str(e)}

    def work(batch: list[ImageRef]):
        results = list(pool.map(decode, batch))
        ok = [(r, t) for r, (t, _) in zip(batch, results) if t is not None]
        skipped = [s for _, s in results if s is not None]
        pixels = torch.stack([t for _, t in ok]) if ok else None
        return [r for r, _ in ok], pixels, skipped

    batches = [refs[i:i + batch_size] for i in range(0, len(refs), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(max(1, workers)) as pool, ThreadPoolExecutor(1) as ahead:
        pending = ahead.submit(work, batches[0])
        for nxt in batches[1:] + [None]:
            result = pending.result()
            pending = ahead.submit(work, nxt) if nxt is not None else None
            yield result


def drop_text_tower(model: torch.nn.Module) -> None:
    """Free the text tower's weights (a third of a ViT-B CLIP's memory) in a model used for images only."""
    import gc
    for name in ("transformer", "token_embedding", "ln_final", "text"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            setattr(model, name, None)
    gc.collect()


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
    for name in ("batch_size", "limit", "chunk_size", "workers"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise AtlasError(f"--{name.replace('_', '-')} must be at least 1")
    root = Path(cfg.images)
    refs = find_images(root, cfg.labels, cfg.limit)
    device = pick_device(cfg.device)
    from .store import STORE_DTYPES
    if cfg.store_dtype not in STORE_DTYPES:
        raise AtlasError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}")
    if cfg.precision != "fp32" and device.type != "cuda":
        raise AtlasError("bf16/fp16 autocast needs a GPU; use --precision fp32 on CPU")
    if loaded is None:
        loaded = load_model(cfg.model, device)
        drop_text_tower(loaded.model)   # compute only needs the vision tower
    info = loaded.info
    head_layers = resolve_layers(cfg.layers, info.layers)
    dist = Distributed(device)
    store = RunStore(cfg.out)
    fields = {"model": info.spec, "architecture": info.architecture, "tag": info.tag,
              "random_weights": info.random_weights, "layers": info.layers, "heads": info.heads,
              "width": info.width, "embed_dim": info.embed_dim, "patch_grid": list(info.grid),
              "image_size": list(info.image_size), "pool_type": info.pool_type, "head_layers": head_layers,
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

    bar = tqdm(total=len(mine), unit="img", desc=f"compute[{dist.rank}]" if dist.active else "compute",
               disable=not progress, position=dist.rank, dynamic_ncols=True)
    chunk = Chunk()
    try:
        draft = max(info.image_size) * 2
        workers = cfg.workers or default_workers()
        for batch, pixels, skipped in decoded_batches(mine, root, loaded.preprocess, cfg.batch_size, workers, draft):
            chunk.skipped += skipped
            if pixels is not None:
                with autocast:
                    d = decomposer(pixels.to(device))
                chunk.image_ids += [r.image_id for r in batch]
                chunk.paths += [r.path for r in batch]
                chunk.labels += [r.label for r in batch]
                chunk.embeddings.append(d.embedding.float().cpu().numpy())
                chunk.components.append((stack_components(d), kinds, comp_layers))
                chunk.heads.append(d.heads.float().cpu().numpy())
            bar.update(len(batch) + len(skipped))
            if len(chunk) + len(chunk.skipped) >= chunk_size:
                store.write_chunk(chunk, head_layers, dist.rank, cfg.store_dtype)
                chunk = Chunk()
    except KeyboardInterrupt:
        # what is decoded and decomposed is complete; keep it, then stop
        if len(chunk) or chunk.skipped:
            store.write_chunk(chunk, head_layers, dist.rank, cfg.store_dtype)
        bar.close()
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        raise SystemExit(130)
    if len(chunk) or chunk.skipped:
        store.write_chunk(chunk, head_layers, dist.rank, cfg.store_dtype)
    bar.close()
    dist.barrier()
    markers = store.usable_markers()   # on every rank, so none waits at the barrier below for a rank that stopped
    if dist.rank == 0:
        store.finish(markers)
    dist.barrier()
    dist.close()
    return {**store.manifest(), "rank": dist.rank}
