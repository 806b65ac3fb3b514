"""TextSpan against the reference algorithm; the job on a real store; pools."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from compute.errors import AtlasError
from compute.textspan import reference_textspan, textspan
from compute.texts import load_pool


def _data(H=4, N=300, D=24, K=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(H, D, D, generator=g) * torch.linspace(2, 0.05, D)   # anisotropic heads
    C = torch.randn(H, N, D, generator=g) @ mix + torch.randn(H, 1, D, generator=g)
    T = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=-1)
    return C, T


@pytest.mark.parametrize("rank", [8, 24])
def test_batched_textspan_reproduces_reference(rank):
    C, T = _data()
    res = textspan(C, T, m=12, rank=rank, dtype=torch.float64)
    m = min(12, rank)   # past `rank` picks there is nothing left to explain
    assert res.picks.shape == (C.shape[0], m)
    for h in range(C.shape[0]):
        picks, explained = reference_textspan(C[h].numpy(), T.numpy(), m, rank)
        assert res.picks[h].tolist() == picks
        np.testing.assert_allclose(res.variance_explained[h].numpy(), explained, atol=1e-10)


def test_float32_agrees_with_float64():
    C, T = _data(seed=1)
    a = textspan(C, T, m=10, rank=16, dtype=torch.float32)
    b = textspan(C, T, m=10, rank=16, dtype=torch.float64)
    assert torch.equal(a.picks, b.picks)


def test_directions_are_orthonormal_and_variance_adds_up():
    C, T = _data(seed=2)
    res = textspan(C, T, m=15, rank=24, dtype=torch.float64)
    gram = res.directions @ res.directions.transpose(1, 2)
    assert torch.allclose(gram, torch.eye(15, dtype=gram.dtype).expand_as(gram), atol=1e-9)
    # removed variance equals the variance of the data along the directions
    C0 = C.double() - C.double().mean(1, keepdim=True)
    captured = ((C0 @ res.directions.transpose(1, 2)) ** 2).sum((1, 2)) / (C.shape[1] - 1) / res.total_variance
    assert torch.allclose(captured, res.cumulative[:, -1], atol=1e-9)
    assert (res.cumulative[:, -1] <= 1 + 1e-9).all()


def test_a_planted_text_is_picked_first():
    """A head that varies along one text's direction only must pick that text, explaining almost everything."""
    g = torch.Generator().manual_seed(3)
    T = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    C = torch.randn(200, 1, generator=g) * 3 * T[17] + 0.01 * torch.randn(200, 16, generator=g)
    res = textspan(C, T, m=3, rank=16)
    assert res.picks[0, 0] == 17 and res.variance_explained[0, 0] > 0.99


def test_job_writes_tables(shapes_run):
    run, m = shapes_run
    ts = pq.read_table(run / "textspan.parquet").to_pylist()
    texts = pq.read_table(run / "texts.parquet")
    assert len(ts) == len(m["head_layers"]) * m["heads"] * 5
    assert {r["rank"] for r in ts} == set(range(5))
    assert all(0 <= r["variance_explained"] <= r["cumulative_variance"] <= 1 + 1e-6 for r in ts)
    assert texts.num_rows == len(load_pool("shapes").texts)


def test_pools():
    general = load_pool("general")
    props = {t for tags in general.tags for t in tags}
    assert len(general.texts) >= 3000 and len(props) >= 20
    assert all(1 <= len(t.split()) <= 10 for t in general.texts)
    assert all(tags for tags in general.tags)
    shapes = load_pool("shapes")
    assert {"color", "shape", "pattern", "size", "position", "background"} <= {t for tags in shapes.tags for t in tags}


def test_user_pools(tmp_path):
    (tmp_path / "p.txt").write_text("a dog\n\n  a   cat \na dog\n" + "x " * 50 + "\n")
    p = load_pool(str(tmp_path / "p.txt"))
    assert p.texts == ["a dog", "a cat"] and not p.tagged
    (tmp_path / "p.csv").write_text("text,tags\na red car,colors;vehicles\nsnow,weather\n")
    assert load_pool(str(tmp_path / "p.csv")).tags == [["colors", "vehicles"], ["weather"]]
    (tmp_path / "bad.csv").write_text("words\nhello\n")
    with pytest.raises(AtlasError, match="text"):
        load_pool(str(tmp_path / "bad.csv"))
    with pytest.raises(AtlasError, match="not found"):
        load_pool("no-such-pool")
