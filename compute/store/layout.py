"""The Parquet store: layout, manifest, atomic chunks and resume. The one place that knows file names.

    RUN/manifest.json
    RUN/images/part-KEY.parquet                        image_id, path, label, embedding
    RUN/components/part-KEY.parquet                    image_id, kind, layer, contribution
    RUN/heads/layer=L/head=H/part-KEY.parquet          image_id, contribution  (layer, head from the path)
    RUN/_chunks/KEY.json                               commit marker of one chunk
    RUN/neurons/layer=L.parquet                        one row per MLP neuron of layer L (second-order effects)

A chunk's part files are written first and its marker last (atomic rename), so
a chunk without a marker is an interrupted one: resume deletes its parts and
does those images again. See docs/store.md for the public schema.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from compute.errors import AtlasError
from compute.images import image_id

SCHEMA_VERSION = 1
#: Manifest fields added after the first schema-1 runs, with the value those runs had.
LEGACY_FIELDS = {"store_dtype": "float32"}
MANIFEST = "manifest.json"
CHUNKS = "_chunks"
# tables written by later steps (TextSpan, labels, metrics, ground truth): RUN/<name>.parquet
DERIVED = ("texts", "textspan", "textspan_heads", "properties", "metrics", "shapes_heads", "shapes_models", "shapes_segmentation",
           "shapes_neurons")


#: Element types a run may store its head and component contributions in (`compute --store-dtype`).
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


def vectors(arr: np.ndarray, dtype: str = "float32") -> pa.FixedSizeListArray:
    """[n, D] -> a Parquet fixed-size list column of float32 (or float16: half the disk; readers widen it)."""
    arr = np.ascontiguousarray(arr, dtype=STORE_DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])


def _scalar_columns(table: pa.Table) -> list[str]:
    """The columns that are not vectors: ids, names, layers (the ones worth a dictionary and min/max statistics)."""
    return [f.name for f in table.schema if not pa.types.is_fixed_size_list(f.type)]


def write_table_atomic(table: pa.Table, path: Path) -> None:
    # a dictionary and statistics on vector columns cost most of a write and buy nothing (floats rarely repeat, and
    # nobody filters on an element's range); the scalar columns keep both
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    scalars = _scalar_columns(table)
    pq.write_table(table, tmp, compression="zstd", use_dictionary=scalars, write_statistics=scalars)
    tmp.replace(path)


def _write_part(part: tuple[Callable[[], pa.Table], Path]) -> None:
    build, path = part
    write_table_atomic(build(), path)


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


@dataclass
class Chunk:
    """One atomic unit of work: the rows of a group of images, and the files that could not be read."""
    image_ids: list[int] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)     # [b, D] each
    components: list[tuple[np.ndarray, list[str], list[int | None]]] = field(default_factory=list)
    heads: list[np.ndarray] = field(default_factory=list)          # [b, Ls, H, D] each
    pool_mlp_share: list[float | None] = field(default_factory=list)   # per image; None without a pool MLP
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.image_ids)

    def key(self) -> str:
        first = self.image_ids[0] if self.image_ids else image_id(self.skipped[0]["path"])
        return f"{first:016x}"


class RunStore:
    """A run folder. Writers use `write_chunk` and `finish`; readers use `manifest` and the paths."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def table_path(self, name: str) -> Path:
        return self.root / f"{name}.parquet"

    def head_dir(self, layer: int, head: int) -> Path:
        return self.root / "heads" / f"layer={layer}" / f"head={head}"

    def neuron_path(self, layer: int) -> Path:
        """RUN/neurons/layer=L.parquet: one row per neuron of MLP layer L (`clip-atlas neurons`)."""
        return self.root / "neurons" / f"layer={layer}.parquet"

    def images_glob(self) -> str:
        """The image table's part files, as a DuckDB/glob pattern."""
        return str(self.root / "images" / "*.parquet")

    def heads_glob(self, layer: int | None = None, head: int | None = None) -> str:
        """One head's part files, or every stored head's (hive partitions layer=L/head=H)."""
        if layer is None:
            return str(self.root / "heads" / "*" / "*" / "*.parquet")
        return str(self.head_dir(int(layer), int(head)) / "*.parquet")

    def property_glob(self, prop: str) -> str:
        return str(self.property_dir(prop) / "*.parquet")

    def property_names(self) -> list[str]:
        """The properties whose vectors are stored (RUN/property_vectors/property=NAME)."""
        folder = self.root / "property_vectors"
        return sorted(p.name.split("=", 1)[1] for p in folder.glob("property=*")) if folder.is_dir() else []

    def neuron_layers(self) -> list[int]:
        """The MLP layers with a neuron table."""
        folder = self.root / "neurons"
        return sorted(int(p.stem.split("=", 1)[1]) for p in folder.glob("layer=*.parquet")) if folder.is_dir() else []

    def property_dir(self, prop: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in " -_" else "_" for ch in prop)
        return self.root / "property_vectors" / f"property={safe}"

    # ---- manifest
    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            m = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise AtlasError(f"{self.root} is not a clip-atlas run (no {MANIFEST})") from None
        except (OSError, json.JSONDecodeError) as e:
            raise AtlasError(f"{self.manifest_path} is unreadable: {e}") from None
        if not isinstance(m, dict) or m.get("schema_version") != SCHEMA_VERSION:
            raise AtlasError(f"{self.manifest_path}: unsupported schema version {m.get('schema_version') if isinstance(m, dict) else '?'}")
        return m

    def is_complete(self) -> bool:
        return self.exists() and self.manifest().get("status") == "complete"

    def require_complete(self) -> dict[str, Any]:
        """The manifest of a finished run, or AtlasError saying how to finish it."""
        m = self.manifest()
        if m.get("status") != "complete":
            raise AtlasError(f"{self.root} is {m.get('status')}; finish it with `clip-atlas compute` first")
        return m

    def write_manifest(self, m: dict[str, Any]) -> None:
        write_json_atomic(m, self.manifest_path)

    def update_manifest(self, **changes: Any) -> dict[str, Any]:
        m = self.manifest()
        m.update(changes)
        self.write_manifest(m)
        return m

    def start(self, fields: dict[str, Any], identity: Iterable[str]) -> dict[str, Any]:
        """Create the manifest, or check that an existing run was made with the same settings (resume)."""
        if self.exists():
            m = self.manifest()
            for k in identity:
                if m.get(k, LEGACY_FIELDS.get(k)) != fields.get(k):
                    raise AtlasError(f"{self.root} holds a run with {k}={m.get(k)!r}, not {fields.get(k)!r}; use another --out")
            m.update(status="partial", resumed_at=time.time())
            self.write_manifest(m)
            return m
        m = {"schema_version": SCHEMA_VERSION, **fields, "status": "partial", "created_at": time.time()}
        self.write_manifest(m)
        return m

    # ---- chunks
    def markers(self) -> list[dict[str, Any]]:
        out = []
        for p in sorted((self.root / CHUNKS).glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # a marker is renamed into place whole; an unreadable one is treated as absent
        return out

    def done_paths(self) -> set[str]:
        done: set[str] = set()
        for m in self.markers():
            done.update(m["paths"])
            done.update(s["path"] for s in m["skipped"])
        return done

    def remove_orphans(self) -> int:
        """Delete part files of chunks that never got their marker (an interrupted run)."""
        keys = {p.stem for p in (self.root / CHUNKS).glob("*.json")}
        removed = 0
        for p in list(self.root.glob("images/*.parquet")) + list(self.root.glob("components/*.parquet")) \
                + list(self.root.glob("heads/*/*/*.parquet")):
            if p.stem.removeprefix("part-") not in keys:
                p.unlink()
                removed += 1
        for p in self.root.rglob(".*.tmp*"):
            p.unlink()
        return removed

    def write_chunk(self, chunk: Chunk, head_layers: list[int], rank: int, dtype: str = "float32",
                    parts: Executor | None = None) -> None:
        """A chunk's part files (on `parts` when given, several at once: Arrow writes without the GIL), then its
        marker; head and component contributions in `dtype`, embeddings in float32."""
        key = chunk.key()
        tables: list[tuple[Callable[[], pa.Table], Path]] = []     # each built by the thread that writes it
        if len(chunk):
            ids = pa.array(chunk.image_ids, pa.int64())
            emb = np.concatenate(chunk.embeddings)
            tables.append((lambda: pa.table({
                "image_id": ids, "path": pa.array(chunk.paths, pa.string()),
                "label": pa.array(chunk.labels, pa.string()), "embedding": vectors(emb),
                "pool_mlp_share": pa.array(chunk.pool_mlp_share or [None] * len(chunk), pa.float32())}),
                self.root / "images" / f"part-{key}.parquet"))
            comp = np.concatenate([c[0] for c in chunk.components])           # [b, K, D]
            kinds, layers = chunk.components[0][1], chunk.components[0][2]
            b, K, _ = comp.shape
            tables.append((lambda: pa.table({
                "image_id": pa.array(np.repeat(chunk.image_ids, K), pa.int64()),
                "kind": pa.array(kinds * b, pa.string()).dictionary_encode(),
                "layer": pa.array(layers * b, pa.int16()),
                "contribution": vectors(comp.reshape(b * K, -1), dtype)}),
                self.root / "components" / f"part-{key}.parquet"))
            heads = np.concatenate(chunk.heads)                               # [b, Ls, H, D]

            def head_table(li: int, h: int) -> pa.Table:   # a head's contiguous copy lives only while it is written
                return pa.table({"image_id": ids, "contribution": vectors(heads[:, li, h], dtype)})

            for li, layer in enumerate(head_layers):
                for h in range(heads.shape[2]):
                    tables.append((partial(head_table, li, h), self.head_dir(layer, h) / f"part-{key}.parquet"))
        written = (parts.map if parts is not None else map)(_write_part, tables)
        list(written)                   # every part is on disk (or its error raised) before the marker
        write_json_atomic({"key": key, "rank": rank, "paths": chunk.paths, "skipped": chunk.skipped},
                          self.root / CHUNKS / f"{key}.json")

    def usable_markers(self) -> list[dict[str, Any]]:
        """The chunk markers, when at least one image was stored; else an error that says why (the run stays
        partial)."""
        markers = self.markers()
        if not any(m["paths"] for m in markers):
            skipped = [s for m in markers for s in m["skipped"]]
            why = f" (the first, {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
            raise AtlasError(f"none of the {len(skipped)} images could be used{why}; nothing to analyse in {self.root}")
        return markers

    def finish(self, markers: list[dict[str, Any]]) -> dict[str, Any]:
        """Mark the run complete, from its chunk markers (`usable_markers`)."""
        skipped = [s for m in markers for s in m["skipped"]]
        return self.update_manifest(status="complete", image_count=sum(len(m["paths"]) for m in markers),
                                    skipped=skipped, finished_at=time.time())

    # ---- derived tables
    def write_derived(self, name: str, table: pa.Table) -> Path:
        if name not in DERIVED:
            raise ValueError(f"unknown derived table {name}")
        path = self.table_path(name)
        write_table_atomic(table, path)
        return path


def stored_head_layers(manifest: dict[str, Any], wanted: list[int] | None, run: str | Path) -> list[int]:
    """The run's stored head layers, or `wanted`, every one of which must be stored."""
    stored = manifest["head_layers"]
    if wanted is None:
        return list(stored)
    missing = sorted(set(wanted) - set(stored))
    if missing:
        raise AtlasError(f"layers {', '.join(map(str, missing))} were not stored in {run} (stored: "
                         f"{', '.join(map(str, stored))}); recompute it with --layers including them")
    return sorted(wanted)
