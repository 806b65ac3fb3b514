"""The query layer: top-k answers equal DuckDB's own, the sandbox holds, stale caches are not served."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

from compute.store.query import Store


@pytest.fixture()
def store(shapes_run):
    run, _ = shapes_run
    return Store(run.parent), run.name


def test_cached_top_k_equals_sql(store):
    s, name = store
    run = s.run(name)
    q = np.random.default_rng(0).standard_normal(run.manifest["embed_dim"]).astype(np.float32)
    fast = s.head_top_k(run, 5, 2, q, k=6)
    slow = s.head_top_k_sql(run, 5, 2, q, k=6)
    assert [h[0] for h in fast] == [i for i, _ in slow]
    np.testing.assert_allclose([h[1] for h in fast], [x for _, x in slow], rtol=1e-5)
    excluded = s.head_top_k(run, 5, 2, q, k=6, exclude=fast[0][0])
    assert fast[0][0] not in [h[0] for h in excluded]


def test_sandbox_refuses_files_outside_the_store(store, tmp_path):
    s, _ = store
    (tmp_path / "x.csv").write_text("a\n1\n")
    with pytest.raises(duckdb.Error):
        s.sql("SELECT * FROM read_csv(?)", [str(tmp_path / "x.csv")])
    with pytest.raises(duckdb.Error):
        s.sql("SET enable_external_access = true")


def test_changed_files_are_reread(shapes_run, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq
    run, _ = shapes_run
    copy = tmp_path / "store" / run.name
    shutil.copytree(run, copy)
    s = Store(copy.parent)
    info = s.run(run.name)
    q = np.ones(info.manifest["embed_dim"], np.float32)
    before = s.head_top_k(info, 5, 0, q, k=1)
    f = next((copy / "heads" / "layer=5" / "head=0").glob("*.parquet"))
    t = pq.read_table(f)
    boosted = np.asarray(t.column("contribution").to_pylist(), np.float32)
    boosted[-1] += 100.0
    from compute.store.layout import vectors
    pq.write_table(pa.table({"image_id": t.column("image_id"), "contribution": vectors(boosted)}), f)
    after = s.head_top_k(info, 5, 0, q, k=1)
    assert after[0][0] == t.column("image_id")[-1].as_py() and after != before


def test_memory_mapped_index_gives_the_same_answers_and_is_dropped_when_stale(shapes_run, tmp_path, monkeypatch):
    import os
    import shutil

    from compute.cli import main
    from compute.store import index as vindex
    from compute.store.index import open_head_index, top_k
    from compute.store.layout import RunStore
    from compute.store.readers import read_head
    run = tmp_path / "run"
    shutil.copytree(shapes_run[0], run)
    s = Store(tmp_path)
    info = s.run("run")
    q = np.random.default_rng(1).standard_normal(info.manifest["embed_dim"]).astype(np.float32)
    before = s.head_top_k(info, 5, 2, q, k=7)                  # Parquet path
    assert main(["index", str(run)]) == 0
    ids, M = open_head_index(RunStore(run), 5, 2)
    assert isinstance(M, np.memmap)
    ref_ids, ref = read_head(RunStore(run), 5, 2)
    order = np.argsort(ids)
    assert np.array_equal(ids[order], ref_ids) and np.array_equal(np.asarray(M)[order], ref)
    assert s.head_top_k(info, 5, 2, q, k=7) == before         # index path: the same exact answer
    # scoring in blocks of 5 rows changes nothing
    def same(hits):
        assert [h[0] for h in hits] == [h[0] for h in before]
        np.testing.assert_allclose([h[1:] for h in hits], [h[1:] for h in before], rtol=1e-5)
    monkeypatch.setattr(vindex, "BLOCK_ROWS", 5)
    same(top_k(ids, M, q, 7))
    # a part file that changes makes the index stale: it is not used until rebuilt
    part = next((run / "heads" / "layer=5" / "head=2").glob("*.parquet"))
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))
    assert open_head_index(RunStore(run), 5, 2) is None
    same(s.head_top_k(info, 5, 2, q, k=7))


def test_hits_carry_the_cosine(store):
    s, name = store
    run = s.run(name)
    q = np.random.default_rng(3).standard_normal(run.manifest["embed_dim"]).astype(np.float32)
    ids, M = s._matrix(str(run.path / "heads" / "layer=5" / "head=2" / "*.parquet"), "contribution")
    for image_id, dot, cos in s.head_top_k(run, 5, 2, q, k=5):
        row = M[list(ids).index(image_id)]
        assert abs(dot - float(row @ q)) < 1e-5 * max(1.0, abs(dot))
        assert abs(cos - float(row @ q) / (np.linalg.norm(row) * np.linalg.norm(q))) < 1e-5
