"""The query layer: read-only DuckDB over one store folder, parameterised queries only.

One connection per store (sandboxed to the store folder), one cursor per thread.
Every function returns plain Python / numpy; the notebook API (`compute/api.py`) and the dashboard's pages
read through it and never write SQL.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import duckdb
import numpy as np

from compute.errors import AtlasError
from compute.store import readers
from compute.store.index import open_head_index, row_norms, top_k
from compute.store.layout import MANIFEST, RunStore
from compute.store.readers import vector_column

DEFAULT_STORE = Path(__file__).resolve().parents[2] / "artifacts"
#: Memory for vector matrices kept between queries (a 50,000 x 512 head is 100 MB).
MATRIX_CACHE_BYTES = 1 << 30
_VECTOR_QUERIES = {
    "contribution": "SELECT image_id, contribution AS v FROM read_parquet(?)",
    "vector": "SELECT image_id, vector AS v FROM read_parquet(?)",
    "direction": "SELECT neuron AS image_id, direction AS v FROM read_parquet(?)",
}


class HeadProperty(NamedTuple):
    layer: int
    head: int
    property: str
    confidence: float


class HeadText(NamedTuple):
    rank: int
    text: str
    variance_explained: float
    cumulative_variance: float


class SpanText(NamedTuple):
    layer: int
    head: int
    rank: int
    text: str


class SpanSummary(NamedTuple):
    layer: int
    head: int
    explained: float
    stability: float


class SpanDirection(NamedTuple):
    layer: int
    head: int
    rank: int
    text: str
    direction: np.ndarray


class MetricValue(NamedTuple):
    layer: int | None
    head: int | None
    metric: str
    value: float


class BoardRow(NamedTuple):
    run: str
    model: str
    metric: str
    value: float


class GroundTruth(NamedTuple):
    layer: int
    head: int
    attribute: str
    lift: float
    specialised: bool


class GalleryImage(NamedTuple):
    image_id: int
    path: str
    label: str | None


@dataclass
class RunInfo:
    name: str
    path: Path
    manifest: dict | None
    problem: str | None      # why the run cannot be used (missing / malformed), else None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def layout(self) -> RunStore:
        """Where each of the run's files lives."""
        return RunStore(self.path)

    def has(self, table: str) -> bool:
        return self.layout.table_path(table).is_file()


def full_path(run: RunInfo, rel_path: str) -> Path:
    """An image's file from its stored path (relative to the run's images root)."""
    return Path(run.manifest["images_root"]) / rel_path


class Store:
    """Read-only access to a store folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self._local = threading.local()
        self._con = duckdb.connect(":memory:")
        # sandbox: only the store folder is readable, and the settings cannot be changed back
        self._con.execute("SET allowed_directories = ?", [[str(self.root)]])
        self._con.execute("SET enable_external_access = false")
        self._con.execute("SET lock_configuration = true")
        self._matrices: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._means: dict[tuple, dict] = {}
        self._norm_cache: dict[tuple, tuple] = {}
        self._matrix_lock = threading.Lock()

    # ---- connection
    def _cur(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self._con.cursor()
        return cur

    def sql(self, query: str, params: list | None = None) -> list[tuple]:
        return self._cur().execute(query, params or []).fetchall()

    def records(self, record: type, query: str, params: list | None = None) -> list:
        """The rows of a query as named records (the query selects the record's fields, in order)."""
        return [record(*row) for row in self.sql(query, params)]

    # ---- runs
    def runs(self) -> list[RunInfo]:
        out = []
        if not self.root.is_dir():
            return out
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or p.name.startswith((".", "_")):
                continue
            if not (p / MANIFEST).is_file():
                if any(p.glob("images/*.parquet")):
                    out.append(RunInfo(p.name, p, None, "no manifest.json (not a finished run)"))
                continue
            try:
                m = RunStore(p).manifest()
                problem = None if m.get("status") == "complete" else f"status {m.get('status')!r}: still computing or interrupted"
            except AtlasError as e:
                m, problem = None, str(e)
            out.append(RunInfo(p.name, p, m, problem))
        return out

    def run(self, name: str) -> RunInfo:
        for r in self.runs():
            if r.name == name:
                return r
        raise AtlasError(f"no run named {name!r} in {self.root}")

    # ---- images
    def image_count(self, run: RunInfo) -> int:
        return self.sql("SELECT count(*) FROM read_parquet(?)", [run.layout.images_glob()])[0][0]

    @staticmethod
    def _gallery_filter(label: str | None, search: str | None) -> tuple[str, list]:
        """The WHERE clause and its parameters: `label` exact, `search` a case-insensitive literal substring of the
        path or the label (% and _ escaped, so they are not wildcards)."""
        pattern = None if not search else "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        clause = ("WHERE (? IS NULL OR label = ?) AND (? IS NULL OR path ILIKE ? ESCAPE '\\' "
                  "OR coalesce(label, '') ILIKE ? ESCAPE '\\')")
        return clause, [label, label, pattern, pattern, pattern]

    def gallery(self, run: RunInfo, limit: int = 24, offset: int = 0, label: str | None = None,
                search: str | None = None) -> list[GalleryImage]:
        """One page of images, ordered by path, filtered as `_gallery_filter` says."""
        where, params = self._gallery_filter(label, search)
        return self.records(GalleryImage, f"SELECT image_id, path, label FROM read_parquet(?) {where} ORDER BY path LIMIT ? OFFSET ?",
                        [run.layout.images_glob(), *params, limit, offset])

    def gallery_count(self, run: RunInfo, label: str | None = None, search: str | None = None) -> int:
        where, params = self._gallery_filter(label, search)
        return self.sql(f"SELECT count(*) FROM read_parquet(?) {where}",
                        [run.layout.images_glob(), *params])[0][0]

    def labels(self, run: RunInfo) -> list[str]:
        return [r[0] for r in self.sql("SELECT DISTINCT label FROM read_parquet(?) WHERE label IS NOT NULL ORDER BY 1",
                                       [run.layout.images_glob()])]

    def image_path(self, run: RunInfo, image_id: int) -> Path | None:
        rows = self.sql("SELECT path FROM read_parquet(?) WHERE image_id = ?", [run.layout.images_glob(), image_id])
        return full_path(run, rows[0][0]) if rows else None

    def image_info(self, run: RunInfo, ids: list[int]) -> dict[int, tuple[str, str | None]]:
        rows = self.sql("SELECT image_id, path, label FROM read_parquet(?) WHERE list_contains(?, image_id)",
                        [run.layout.images_glob(), ids])
        return {i: (p, l) for i, p, l in rows}

    def image_by_path(self, run: RunInfo, rel_path: str) -> int | None:
        rows = self.sql("SELECT image_id FROM read_parquet(?) WHERE path = ?", [run.layout.images_glob(), rel_path])
        return int(rows[0][0]) if rows else None

    def stored_head(self, run: RunInfo, image_id: int, layer: int, head: int) -> np.ndarray | None:
        rows = self.sql("SELECT contribution FROM read_parquet(?) WHERE image_id = ?",
                        [run.layout.heads_glob(layer, head), image_id])
        return np.asarray(rows[0][0], np.float32) if rows else None

    def stored_property_vector(self, run: RunInfo, image_id: int, prop: str) -> np.ndarray | None:
        rows = self.sql("SELECT vector FROM read_parquet(?) WHERE image_id = ?",
                        [run.layout.property_glob(prop), image_id])
        return np.asarray(rows[0][0], np.float32) if rows else None

    # ---- nearest neighbours: brute force over one head's (or property's) files only
    def _matrix(self, pattern: str, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(image_ids, vectors [N, D]) of the Parquet files matching `pattern`, read through DuckDB once and
        kept in memory (LRU, MATRIX_CACHE_BYTES) until the files change."""
        files = sorted(Path(pattern).parent.glob(Path(pattern).name))
        if not files:
            raise AtlasError(f"no stored vectors at {Path(pattern).parent}")
        key = (pattern, column, tuple((f.name, f.stat().st_mtime_ns) for f in files))
        with self._matrix_lock:
            if key in self._matrices:
                self._matrices.move_to_end(key)
                return self._matrices[key]
        table = self._cur().sql(_VECTOR_QUERIES[column], params=[pattern]).to_arrow_table()
        entry = (table.column("image_id").to_numpy(), np.ascontiguousarray(readers.vector_column(table, "v")))
        with self._matrix_lock:
            self._matrices[key] = entry
            while sum(e[1].nbytes for e in self._matrices.values()) > MATRIX_CACHE_BYTES and len(self._matrices) > 1:
                self._matrices.popitem(last=False)
        return entry

    def head_means(self, run: RunInfo) -> dict[tuple[int, int], np.ndarray]:
        """Every stored head's mean contribution over the run's images, {(layer, head): [D] float64}: one streamed
        pass over the run (memory: one chunk), kept until the run's manifest changes."""
        key = ("means", str(run.path), (run.path / MANIFEST).stat().st_mtime_ns)
        with self._matrix_lock:
            if key in self._means:
                return self._means[key]
        m = run.manifest
        pairs = [(l, h) for l in m.get("head_layers", []) for h in range(m["heads"])]
        means = dict(zip(pairs, readers.head_means(run.layout, pairs))) if pairs else {}
        with self._matrix_lock:
            self._means = {key: means}          # one run's means at a time: they are small, the pass is not
        return means

    def image_heads(self, run: RunInfo, image_id: int) -> dict[tuple[int, int], np.ndarray]:
        """One stored image's contribution through every stored head, {(layer, head): [D]}, in one query."""
        rows = self.sql("SELECT layer, head, contribution FROM read_parquet(?, hive_partitioning = true) "
                        "WHERE image_id = ?", [run.layout.heads_glob(), int(image_id)])
        return {(int(l), int(h)): np.asarray(c, np.float32) for l, h, c in rows}

    def head_top_k(self, run: RunInfo, layer: int, head: int, query: np.ndarray, k: int = 8,
                   exclude: int | None = None, by: str = "cosine") -> list[tuple[int, float, float]]:
        """Exact top-k images by cosine (or dot product) with one head's contributions, (image_id, dot, cosine):
        from the head's memory-mapped index when `clip-atlas index` built a current one (no re-read, any N), else
        from Parquet through DuckDB (LRU). Row norms are computed once per matrix and kept beside it."""
        index = open_head_index(RunStore(run.path), layer, head)
        if index is None:
            index = self._matrix(run.layout.heads_glob(layer, head), "contribution")
        return top_k(*index, query, k, exclude, by, self._norms_of(index[1]) if by == "cosine" else None)

    def property_top_k(self, run: RunInfo, prop: str, query: np.ndarray, k: int = 4,
                       exclude: int | None = None) -> list[tuple[int, float, float]]:
        ids, M = self._matrix(run.layout.property_glob(prop), "vector")
        return top_k(ids, M, query, k, exclude, norms=self._norms_of(M))

    def _norms_of(self, M: np.ndarray) -> np.ndarray:
        """Row norms of a cached matrix or memory-mapped index, kept while it is (keyed by the file or object)."""
        path = getattr(M, "filename", None)             # a memory-mapped index: its file and when it was written
        key = (path, Path(path).stat().st_mtime_ns, M.shape) if path else (id(M), M.shape)
        with self._matrix_lock:
            hit = self._norm_cache.get(key)
        if hit is None or (path is None and hit[0] is not M):
            hit = (M, row_norms(M))
            with self._matrix_lock:
                self._norm_cache[key] = hit
                while len(self._norm_cache) > 64:
                    self._norm_cache.pop(next(iter(self._norm_cache)))
        return hit[1]

    def head_top_k_sql(self, run: RunInfo, layer: int, head: int, query: np.ndarray, k: int = 8) -> list[tuple[int, float]]:
        """The same query (ranked by cosine; (image_id, dot) per hit) answered by DuckDB from the Parquet files each
        time (the cold path; for benchmarks)."""
        return self.sql("""
            SELECT image_id, list_dot_product(contribution, ?::FLOAT[]) AS score
            FROM read_parquet(?) ORDER BY list_cosine_similarity(contribution, ?::FLOAT[]) DESC LIMIT ?""",
            [np.asarray(query, np.float32).tolist(), run.layout.heads_glob(layer, head),
             np.asarray(query, np.float32).tolist(), k])

    # ---- TextSpan, properties, metrics
    def head_texts(self, run: RunInfo, layer: int, head: int) -> list[HeadText]:
        if not run.has("textspan"):
            return []
        return self.records(HeadText, """
            SELECT rank, text, variance_explained, cumulative_variance FROM read_parquet(?)
            WHERE layer = ? AND head = ? ORDER BY rank""", [str(run.layout.table_path("textspan")), layer, head])

    def all_head_texts(self, run: RunInfo) -> list[SpanText]:
        """(layer, head, rank, text) of every head, in rank order."""
        if not run.has("textspan"):
            return []
        return self.records(SpanText, "SELECT layer, head, rank, text FROM read_parquet(?) ORDER BY layer, head, rank",
                        [str(run.layout.table_path("textspan"))])

    def textspan_summary(self, run: RunInfo) -> list[SpanSummary]:
        """(layer, head, share of variance its texts explain, stability) per head."""
        if not run.has("textspan_heads"):
            return []
        return self.records(SpanSummary, "SELECT layer, head, explained, stability FROM read_parquet(?) ORDER BY layer, head",
                        [str(run.layout.table_path("textspan_heads"))])

    def head_direction(self, run: RunInfo, layer: int, head: int, rank: int = 0) -> np.ndarray | None:
        """The head's TextSpan direction at `rank` (its main text direction for rank 0)."""
        if not run.has("textspan"):
            return None
        rows = self.sql("SELECT direction FROM read_parquet(?) WHERE layer = ? AND head = ? AND rank = ?",
                        [str(run.layout.table_path("textspan")), layer, head, rank])
        return np.asarray(rows[0][0], np.float32) if rows else None

    def textspan_directions(self, run: RunInfo) -> list[SpanDirection]:
        """(layer, head, rank, text, unit direction [D]) of every head's TextSpan picks, in rank order."""
        if not run.has("textspan"):
            return []
        rows = self.sql("SELECT layer, head, rank, text, direction FROM read_parquet(?) ORDER BY layer, head, rank",
                        [str(run.layout.table_path("textspan"))])
        return [SpanDirection(l, h, r, t, np.asarray(d, np.float32)) for l, h, r, t, d in rows]

    def properties(self, run: RunInfo) -> list[HeadProperty]:
        if not run.has("properties"):
            return []
        return self.records(HeadProperty, "SELECT layer, head, property, confidence FROM read_parquet(?) ORDER BY layer, head",
                        [str(run.layout.table_path("properties"))])

    def property_names(self, run: RunInfo) -> list[str]:
        return run.layout.property_names()

    def heads_with_property(self, run: RunInfo, prop: str, required: bool = False) -> list[tuple[int, int]]:
        """The heads the run labels `prop`; with `required`, none is an AtlasError naming the labels there are."""
        labels = self.properties(run)
        heads = sorted((r.layer, r.head) for r in labels if r.property == prop)
        if required and not heads:
            if not run.has("properties"):
                raise AtlasError(f"{run.path} has no labels; run `clip-atlas label {run.path}` first")
            known = sorted({r.property for r in labels} - {"unlabelled"})
            raise AtlasError(f"no head of {run.name} is labelled {prop!r} (labelled: {', '.join(known) or 'none'})")
        return heads

    def metrics(self, run: RunInfo, scope: str) -> list[MetricValue]:
        if not run.has("metrics"):
            return []
        return self.records(MetricValue, "SELECT layer, head, metric, value FROM read_parquet(?) WHERE scope = ? ORDER BY metric, layer, head",
                        [str(run.layout.table_path("metrics")), scope])

    def leaderboard(self) -> list[BoardRow]:
        """Every complete run's model-scope metrics. A run is named by its folder (a copied or renamed run keeps
        the name it was written under inside its tables)."""
        name_of = {str(r.layout.table_path("metrics")): r.name for r in self.runs() if r.ok and r.has("metrics")}
        if not name_of:
            return []
        rows = self.sql("""
            SELECT filename, model, metric, value FROM read_parquet(?, union_by_name = true, filename = true)
            WHERE scope = 'model'""", [list(name_of)])
        return sorted((BoardRow(name_of[f], model, metric, value) for f, model, metric, value in rows),
                      key=lambda r: (r.run, r.metric))

    def ground_truth(self, run: RunInfo) -> list[GroundTruth]:
        if not run.has("shapes_heads"):
            return []
        return self.records(GroundTruth, "SELECT layer, head, attribute, lift, specialised FROM read_parquet(?) ORDER BY layer, head, attribute",
                        [str(run.layout.table_path("shapes_heads"))])

    # ---- neurons (`clip-atlas neurons`)
    NEURON_COLUMNS = ("layer", "neuron", "mean_norm", "max_norm", "direct_mean_norm", "direction_share", "texts",
                      "text_weights", "text_share", "main_head_layer", "main_head", "main_head_share", "images")
    NEURON_ORDER = {"mean_norm": "mean_norm DESC", "max_norm": "max_norm DESC",
                    "direction_share": "direction_share DESC", "text_share": "text_share DESC", "neuron": "neuron"}

    def neuron_layers(self, run: RunInfo) -> list[int]:
        return run.layout.neuron_layers()

    def _neuron_file(self, run: RunInfo, layer: int) -> str:
        if layer not in self.neuron_layers(run):
            have = ", ".join(map(str, self.neuron_layers(run))) or "none"
            raise AtlasError(f"no neuron table for layer {layer} in {run.name} (have: {have}; "
                             f"`clip-atlas neurons RUN --layers {layer}` writes it)")
        return str(run.layout.neuron_path(layer))

    def neurons(self, run: RunInfo, layer: int, order: str = "mean_norm", limit: int = 50, offset: int = 0,
                ids: list[int] | None = None) -> list[dict]:
        """One dict per neuron of `layer` (NEURON_COLUMNS), sorted by `order` (a key of NEURON_ORDER)."""
        if order not in self.NEURON_ORDER:
            raise AtlasError(f"unknown neuron order {order!r} (use {', '.join(self.NEURON_ORDER)})")
        rows = self._cur().execute(f"""
            SELECT {', '.join(self.NEURON_COLUMNS)} FROM read_parquet(?)
            WHERE ? IS NULL OR list_contains(?, neuron)
            ORDER BY {self.NEURON_ORDER[order]}, neuron LIMIT ? OFFSET ?""",
            [self._neuron_file(run, layer), ids, ids, limit, offset])
        names = [d[0] for d in rows.description]
        return [dict(zip(names, r)) for r in rows.fetchall()]

    def neuron_count(self, run: RunInfo, layer: int) -> int:
        return self.sql("SELECT count(*) FROM read_parquet(?)", [self._neuron_file(run, layer)])[0][0]

    def neuron_top_images(self, run: RunInfo, layer: int, neuron: int) -> list[tuple[int, float]]:
        rows = self.sql("SELECT top_image_ids, top_norms FROM read_parquet(?) WHERE neuron = ?",
                        [self._neuron_file(run, layer), neuron])
        if not rows:
            raise AtlasError(f"no neuron {neuron} in layer {layer} of {run.name}")
        return list(zip(rows[0][0], rows[0][1]))

    def neuron_directions(self, run: RunInfo, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(neuron ids, unit directions [n, D]) of one layer, cached like the head matrices."""
        pattern = self._neuron_file(run, layer)
        return self._matrix(pattern, "direction")

    def neurons_through_head(self, run: RunInfo, layer: int, head: int, limit: int = 10) -> list[dict]:
        """Neurons of every stored layer whose second-order effect flows mainly through head (layer, head)."""
        out: list[dict] = []
        for nl in self.neuron_layers(run):
            if nl >= layer:
                continue
            rows = self._cur().execute(f"""
                SELECT {', '.join(self.NEURON_COLUMNS)} FROM read_parquet(?)
                WHERE main_head_layer = ? AND main_head = ? ORDER BY mean_norm * main_head_share DESC LIMIT ?""",
                [self._neuron_file(run, nl), layer, head, limit])
            names = [d[0] for d in rows.description]
            out += [dict(zip(names, r)) for r in rows.fetchall()]
        return sorted(out, key=lambda r: -r["mean_norm"] * r["main_head_share"])[:limit]

    def text_pool(self, run: RunInfo) -> np.ndarray | None:
        """The run's description-pool embeddings [T, D] (texts.parquet), or None."""
        if not run.has("texts"):
            return None
        table = self._cur().sql("SELECT embedding FROM read_parquet(?)", params=[str(run.layout.table_path("texts"))]).to_arrow_table()
        return vector_column(table, "embedding")


POOL_NAMES = {"tok": "class token", "avg": "average", "map": "attention pool"}


def manifest_summary(run: RunInfo) -> dict:
    m = run.manifest or {}
    return {"run": run.name, "model": m.get("model"), "family": m.get("family", "open_clip ViT") if m else None,
            "pool": POOL_NAMES.get(m.get("pool_type"), m.get("pool_type")) if m else None,
            "random weights": m.get("random_weights"), "images": m.get("image_count"),
            "status": m.get("status", "?") if run.ok else run.problem,
            "layers x heads": f"{m.get('layers')} x {m.get('heads')}" if m else None,
            "parameters": m.get("parameters"), "training": m.get("training")}

