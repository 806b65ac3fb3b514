"""The query layer: top-k answers equal DuckDB's own, the sandbox holds, stale caches are not served."""
from __future__ import annotations

import duckdb
import numpy as np
import pytest

from compute.query import Store


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
    assert [i for i, _ in fast] == [i for i, _ in slow]
    np.testing.assert_allclose([x for _, x in fast], [x for _, x in slow], rtol=1e-5)
    excluded = s.head_top_k(run, 5, 2, q, k=6, exclude=fast[0][0])
    assert fast[0][0] not in [i for i, _ in excluded]


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
    from compute.store import vectors
    pq.write_table(pa.table({"image_id": t.column("image_id"), "contribution": vectors(boosted)}), f)
    after = s.head_top_k(info, 5, 0, q, k=1)
    assert after[0][0] == t.column("image_id")[-1].as_py() and after != before
