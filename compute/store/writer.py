"""Writing a run's chunks in the background, so that the next batches are computed while one chunk is written.

At most one chunk is in flight: `submit` waits for the previous one first, so memory holds two chunks at most (the
one on its way to disk and the one being filled). A chunk's part files are written several at once, and its marker
last (layout.RunStore.write_chunk), so an interrupted write leaves no marker and resume redoes those images.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from compute.store.layout import Chunk, RunStore


class ChunkWriter:
    """`submit` chunks in order; `close` (or leaving the `with` block, error or not) waits for the last one and
    raises its error if it failed."""

    def __init__(self, store: RunStore, head_layers: list[int], rank: int, dtype: str, threads: int):
        self.store, self.head_layers, self.rank, self.dtype = store, head_layers, rank, dtype
        self._parts = ThreadPoolExecutor(max(1, threads), thread_name_prefix="parquet-part")
        self._chunks = ThreadPoolExecutor(1, thread_name_prefix="chunk-writer")
        self._pending: Future | None = None

    def submit(self, chunk: Chunk) -> None:
        self.wait()
        self._pending = self._chunks.submit(self.store.write_chunk, chunk, self.head_layers, self.rank, self.dtype,
                                            self._parts)

    def wait(self) -> None:
        """Until the chunk in flight is on disk; its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._chunks.shutdown()
            self._parts.shutdown()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
