"""Where a job runs: the device, the ranks under torchrun, the decoding threads, and batches of decoded images."""
from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from compute.errors import AtlasError
from compute.images import BadImage, ImageRef, load_image


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
