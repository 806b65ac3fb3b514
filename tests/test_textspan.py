"""TextSpan against the reference algorithm; the job on a real store; pools."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from compute.errors import AtlasError
from compute.maths.textspan import Moments, half_of, pick_overlap, reference_textspan, textspan
from compute.texts import load_pool


def _data(H=4, N=300, D=24, K=120, seed=0, true_rank=None):
    """Anisotropic heads (optionally of rank `true_rank` < D, like a head's W_O image) and random unit texts."""
    g = torch.Generator().manual_seed(seed)
    r = true_rank or D
    mix = torch.randn(H, r, D, generator=g, dtype=torch.float64) * torch.linspace(2, 0.05, r, dtype=torch.float64)[:, None]
    C = torch.randn(H, N, r, generator=g, dtype=torch.float64) @ mix + torch.randn(H, 1, r, generator=g, dtype=torch.float64) @ mix
    T = torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=-1)
    return C, T


@pytest.mark.parametrize("rank", [8, 16])
def test_matches_reference_at_or_below_the_true_rank(rank):
    """Where the reference is well defined (r <= the true rank, no early stop) the picks are the reference's."""
    C, T = _data(D=32, true_rank=16)
    res = textspan(C, T, m=rank, rank=rank, floor=0.0)
    assert res.picks.shape == (C.shape[0], rank) and (res.rank == rank).all()
    for h in range(C.shape[0]):
        picks, explained = reference_textspan(C[h].numpy(), T.numpy(), rank, rank)
        assert res.head_picks(h) == picks
        np.testing.assert_allclose(res.variance_explained[h].numpy(), explained, atol=1e-10)


def test_rank_is_capped_at_the_numerical_rank_and_picks_stop_there():
    C, T = _data(D=32, true_rank=12)
    res = textspan(C.float(), T, m=30, rank=80)
    assert (res.rank == 12).all() and (res.n_picks <= 12).all()
    assert (res.picks[:, 12:] == -1).all()


def test_rank_above_the_true_rank_changes_nothing():
    """Asking for rank 80 or rank 16 on a rank-16 head (stored in float32) gives the same picks."""
    C, T = _data(D=48, true_rank=16, seed=5)
    C = C.float()
    a, b = textspan(C, T, m=16, rank=80), textspan(C, T, m=16, rank=16)
    assert torch.equal(a.picks, b.picks)


def test_picks_do_not_depend_on_a_rotation_of_the_null_space():
    """Rotating every text's component outside the head's span (norms kept) must not change a pick:
    the result may not depend on arbitrary basis choices there. (The reference at rank > true rank does.)"""
    C, T = _data(H=1, D=40, true_rank=10, seed=6, K=200)
    C = C.float()
    _, _, vh = torch.linalg.svd(C[0].double())
    span, null = vh[:10], vh[10:]                      # orthonormal bases of the span and its complement
    g = torch.Generator().manual_seed(7)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    R = span.T @ span + null.T @ Q @ null              # identity on the span, a random rotation off it
    T2 = T @ R.T
    assert torch.allclose(T2.norm(dim=-1), torch.ones(len(T2), dtype=T2.dtype))
    assert torch.equal(textspan(C, T, m=10, rank=80).picks, textspan(C, T2, m=10, rank=80).picks)
    # the reference at rank 20 (> the true rank 10) is not invariant: its noise directions see the rotation
    ref = [reference_textspan(C[0].numpy(), t.numpy(), 10, 20)[0] for t in (T, T2)]
    assert ref[0] != ref[1]


def test_float32_agrees_with_float64():
    C, T = _data(D=32, true_rank=20, seed=1)
    a = textspan(C.float(), T.float(), m=10, rank=80)
    b = textspan(C, T, m=10, rank=80)
    assert torch.equal(a.picks, b.picks) and torch.equal(a.rank, b.rank)


def test_moments_of_halves_add_up_to_the_whole():
    C, _ = _data(H=2, N=101, seed=8)
    second = half_of(torch.arange(101))
    assert 30 < int(second.sum()) < 71                 # a real split
    whole = Moments.of(C[:, ~second]) + Moments.of(C[:, second])
    ref = Moments.of(C)
    assert whole.n == ref.n and torch.allclose(whole.gram, ref.gram) and torch.allclose(whole.covariance(), ref.covariance())
    streamed = Moments.zeros(2, C.shape[-1])
    for i in range(0, 101, 17):
        streamed.add(C[:, i:i + 17])
    assert torch.allclose(streamed.covariance(), torch.stack([torch.cov(c.T) for c in C]))


def test_directions_are_orthonormal_and_variance_adds_up():
    C, T = _data(seed=2)
    res = textspan(C, T, m=15, rank=24, floor=0.0)
    gram = res.directions @ res.directions.transpose(1, 2)
    assert torch.allclose(gram, torch.eye(15, dtype=gram.dtype).expand_as(gram), atol=1e-9)
    # removed variance equals the variance of the data along the directions
    C0 = C.double() - C.double().mean(1, keepdim=True)
    captured = ((C0 @ res.directions.transpose(1, 2)) ** 2).sum((1, 2)) / (C.shape[1] - 1) / res.total_variance
    assert torch.allclose(captured, res.cumulative[:, -1], atol=1e-9)
    assert (res.cumulative[:, -1] <= 1 + 1e-9).all()


def test_picking_stops_at_the_floor():
    C, T = _data(D=24, seed=4)
    res = textspan(C, T, m=24, rank=24, floor=0.02)
    for h in range(C.shape[0]):
        n = int(res.n_picks[h])
        assert (res.variance_explained[h, :n] >= 0.02).all() and (res.variance_explained[h, n:] == 0).all()


def test_a_planted_text_is_picked_first():
    """A head that varies along one text's direction only must pick that text, explaining almost everything."""
    g = torch.Generator().manual_seed(3)
    T = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=-1)
    C = torch.randn(200, 1, generator=g) * 3 * T[17] + 0.01 * torch.randn(200, 16, generator=g)
    res = textspan(C, T, m=3, rank=16)
    assert res.picks[0, 0] == 17 and res.variance_explained[0, 0] > 0.99


def test_pick_overlap():
    assert pick_overlap([1, 2, 3, 4, 5], [5, 4, 3, 9, 8]) == 0.6
    assert pick_overlap([1, 2], [1, 2, 3]) == 2 / 3 and pick_overlap([], []) == 1.0


@pytest.fixture(scope="module")
def vit_b32_heads():
    """The last layer's 12 heads of a random-init ViT-B-32 (biases and LayerNorm gains perturbed), 96 images."""
    from compute.maths.decompose import Decomposer

    from .conftest import random_model
    model = random_model("ViT-B-32")
    g = torch.Generator().manual_seed(11)
    images = torch.randn(96, 3, 224, 224, generator=g)
    dec = Decomposer(model, head_layers=[11])
    with torch.no_grad():
        heads = torch.cat([dec(images[i:i + 24]).heads[:, 0] for i in range(0, 96, 24)])   # [N, H, D]
    texts = torch.nn.functional.normalize(torch.randn(300, heads.shape[-1], generator=g), dim=-1)
    return heads.transpose(0, 1).contiguous(), texts


def test_vit_b32_heads_have_rank_head_dim_and_rank_80_equals_rank_64(vit_b32_heads):
    """The issue's check: on ViT-B-32 heads (head_dim 64), --rank 80 and --rank 64 pick identically,
    because both use the head's numerical rank, 64."""
    C, T = vit_b32_heads
    a, b = textspan(C, T, m=20, rank=80), textspan(C, T, m=20, rank=64)
    assert (a.rank == 64).all() and (b.rank == 64).all()
    assert torch.equal(a.picks, b.picks)
    assert torch.equal(textspan(C.double(), T.double(), m=20, rank=80).picks, a.picks)


def test_job_writes_tables(shapes_run):
    run, m = shapes_run
    ts = pq.read_table(run / "textspan.parquet").to_pylist()
    texts = pq.read_table(run / "texts.parquet")
    heads = pq.read_table(run / "textspan_heads.parquet").to_pylist()
    assert len(heads) == len(m["head_layers"]) * m["heads"]
    assert len(ts) == sum(h["picks"] for h in heads)
    for h in heads:
        assert h["effective_rank"] == 16 and 1 <= h["picks"] <= 10       # head_dim of the Shapes CLIP; default m
        assert 0 <= h["stability"] <= 1 and len(h["basis"]) == 16 * 128 and len(h["span_covariance"]) == 16 * 16
    assert max(r["rank"] for r in ts) < 10
    assert all(0 <= r["variance_explained"] <= r["cumulative_variance"] <= 1 + 1e-6 for r in ts)
    assert texts.num_rows == len(load_pool("shapes").texts)


def test_pools():
    general = load_pool("general")
    counts = Counter(t for tags in general.tags for t in tags)
    assert len(general.texts) >= 3500 and len(set(general.texts)) == len(general.texts)
    assert len(counts) >= 20 and min(counts.values()) >= 80, counts.most_common()[-3:]
    assert all(1 <= len(t.split()) <= 9 for t in general.texts)
    assert all(tags for tags in general.tags)
    shapes = load_pool("shapes")
    assert {"color", "shape", "pattern", "size", "position", "background"} <= {t for tags in shapes.tags for t in tags}


def test_grammar_helpers_known_answers():
    from compute.texts.build_pools import article, plural
    assert [article(w) for w in ("apple", "dog", "hour", "unicorn", "old man", "8", "European", "umbrella")] == \
        ["an", "a", "an", "a", "an", "an", "a", "an"]
    assert [plural(w) for w in ("dog", "fox", "butterfly", "mouse", "sheep", "old woman", "bus", "key", "loaf of bread",
                                 "fire truck", "cactus", "peach")] == \
        ["dogs", "foxes", "butterflies", "mice", "sheep", "old women", "buses", "keys", "loaves of bread",
         "fire trucks", "cacti", "peaches"]


def test_general_pool_grammar():
    """The rules the generator can get wrong: a/an by sound, counts with plurals, no 'a pair of' a single thing."""
    from compute.texts.build_pools import CONSONANT_SOUND, COUNTS, VOWEL_SOUND, W, plural
    texts = load_pool("general").texts
    singular = {w for words in W.values() for w in words}
    plurals = {plural(w) for w in singular}
    for t in texts:
        words = t.split()
        assert "  " not in t and t == t.strip()
        for w1, w2 in zip(words, words[1:]):
            assert (w1, w2) not in {("a", "a"), ("a", "an"), ("the", "the"), ("a", "the"), ("an", "the")}, t
            if w1 in ("a", "an") and not w2[0].isdigit():
                vowel = (w2[0].lower() in "aeiou" and not w2.lower().startswith(CONSONANT_SOUND)) or w2.lower().startswith(VOWEL_SOUND)
                assert w1 == ("an" if vowel else "a"), t
        for n in COUNTS:
            if t.startswith(n + " "):
                rest = t[len(n) + 1:]
                assert rest in plurals and rest not in singular - plurals, t       # "two dogs", never "two dog"
        if t.startswith("a single "):
            assert t[len("a single "):] in singular, t
        assert "a pair of" not in t or t == "a pair of dice", t


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
