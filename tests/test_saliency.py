"""Segmentation metrics and saliency baselines on inputs with known answers, and against slow references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compute.maths.saliency import baseline_maps, rollout_matrix, trace_attention
from compute.maths.segmetrics import SegmentationScores, average_precision
from compute.maths.towers import tower

from .conftest import random_model

# ---------------------------------------------------------------- metrics

def slow_ap(scores: np.ndarray, target: np.ndarray) -> float:
    """Precision at every distinct threshold, weighted by the recall it adds: the textbook definition."""
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores.tolist()), reverse=True):
        pred = scores >= thr
        tp = (pred & target).sum()
        recall = tp / target.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    return float(ap)


def test_perfect_map_scores_one():
    mask = np.zeros((16, 16), bool)
    mask[4:9, 3:12] = True
    s = SegmentationScores()
    assert s.add(mask.astype(float) * 3 + 1, mask) == {"pixel_accuracy": 1.0, "iou_foreground": 1.0, "ap": 1.0,
                                                       "ap_paper": 1.0}
    assert s.result() == {"pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0, "map_paper": 1.0}


def test_constant_map_ap_is_foreground_share():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 20)) < 0.3
    assert average_precision(np.full(mask.shape, 0.7), mask) == pytest.approx(mask.mean())
    s = SegmentationScores()
    s.add(np.zeros(mask.shape), mask)     # nothing above the mean: all predicted background
    r = s.result()
    assert r["pixel_accuracy"] == pytest.approx(1 - mask.mean())
    assert r["miou"] == pytest.approx((1 - mask.mean()) / 2)     # background IoU = its share, foreground 0


def test_average_precision_matches_textbook_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scores = rng.integers(0, 6, 300).astype(float)    # many ties
        target = rng.random(300) < 0.4
        assert average_precision(scores, target) == pytest.approx(slow_ap(scores, target), abs=1e-12)


def test_paper_ap_is_the_two_channel_ap_of_the_normalised_map():
    """Against the plain definition: normalise, stack (1 - map, background) and (map, foreground), one AP."""
    from compute.maths.segmetrics import paper_average_precision
    rng = np.random.default_rng(2)
    for _ in range(10):
        heat = rng.integers(0, 5, (12, 12)).astype(float) * 0.3 - 0.4
        mask = rng.random((12, 12)) < 0.35
        r = (heat - heat.min()) / (heat.max() - heat.min())
        ref = slow_ap(np.concatenate([(1 - r).ravel(), r.ravel()]), np.concatenate([~mask.ravel(), mask.ravel()]))
        assert paper_average_precision(heat, mask) == pytest.approx(ref, abs=1e-12)
    assert np.isnan(paper_average_precision(np.ones((4, 4)), np.eye(4, dtype=bool)))
    mask = np.zeros((8, 8), bool)
    mask[2:5, 1:4] = True
    inverted = SegmentationScores()
    inverted.add(1.0 - mask, mask)        # high on the background: both channels rank everything wrong first
    assert inverted.result()["map_paper"] == pytest.approx(0.5)


def test_iou_accumulates_over_images():
    a, b = np.zeros((4, 4), bool), np.zeros((8, 8), bool)
    a[:2] = True
    b[:, :4] = True
    s = SegmentationScores()
    s.add(a.astype(float), a)                   # perfect
    wrong = s.add(np.fliplr(b).astype(float), b)       # exactly wrong
    assert wrong["pixel_accuracy"] == 0 and wrong["iou_foreground"] == 0
    r = s.result()
    assert r["pixel_accuracy"] == pytest.approx(16 / 80)
    # background: inter 8 + 0, union 8 + 64; foreground: inter 8 + 0, union 8 + 64
    assert r["miou"] == pytest.approx(8 / 72)
    assert s.images == 2


# ---------------------------------------------------------------- rollout

def test_rollout_of_identity_attention_is_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    R = rollout_matrix([eye, eye, eye])
    assert torch.allclose(R, torch.eye(5).expand(2, 5, 5))


def test_rollout_matches_the_recursion():
    g = torch.Generator().manual_seed(0)
    probs = [torch.softmax(torch.randn(1, 2, 4, 4, generator=g), -1) for _ in range(3)]
    R = torch.eye(4)
    for p in probs:
        a = 0.5 * p[0].mean(0) + 0.5 * torch.eye(4)
        R = (a / a.sum(1, keepdim=True)) @ R
    assert torch.allclose(rollout_matrix(probs)[0], R, atol=1e-6)
    assert torch.allclose(rollout_matrix(probs).sum(-1), torch.ones(1, 4), atol=1e-6)   # rows stay distributions


# ---------------------------------------------------------------- gradient methods against a per-head loop

def slow_trace(visual, image: torch.Tensor):
    """The tower with every head computed on its own, each head's attention a separate tensor in the graph."""
    x = visual._embeds(image)[0]
    layers = []
    for blk in visual.transformer.resblocks:
        a = blk.attn
        W, H = a.embed_dim, a.num_heads
        hd = W // H
        h_in = blk.ln_1(x)
        Wq, Wk, Wv = a.in_proj_weight.split(W)
        bq, bk, bv = a.in_proj_bias.split(W)
        outs, heads = [], []
        for h in range(H):
            s = slice(h * hd, (h + 1) * hd)
            q, k, v = h_in @ Wq[s].T + bq[s], h_in @ Wk[s].T + bk[s], h_in @ Wv[s].T + bv[s]
            A = torch.softmax(q @ k.T / hd ** 0.5, dim=-1)
            A.retain_grad()
            heads.append(A)
            outs.append(A @ v)
        x = x + blk.ls_1(torch.cat(outs, -1) @ a.out_proj.weight.T + a.out_proj.bias)
        x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        layers.append(heads)
    pooled, _ = visual._pool(x[None])
    return (pooled @ visual.proj if visual.proj is not None else pooled)[0], layers


@pytest.mark.parametrize("name", ["clip-atlas-shapes", "tiny-avg-ls"])
def test_gradcam_and_chefer_match_slow_reference(name):
    model = random_model(name, torch.float64)
    visual = model.visual
    size = visual.image_size[0]
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    texts = F.normalize(torch.randn(2, model.visual.output_dim, generator=g, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        assert torch.allclose(trace_attention(tower(model), images).embedding, model.encode_image(images), atol=1e-10)
    fast = baseline_maps(tower(model), images, texts)
    rows = slice(0, 1) if visual.pool_type == "tok" else slice(1, None)
    for b in range(2):
        emb, layers = slow_trace(visual, images[b:b + 1])
        (F.normalize(emb, dim=-1) @ texts[b]).backward()
        H = len(layers[0])
        cam = (sum(A.grad[rows, 1:].mean() * A[rows, 1:].mean(0) for A in layers[-1]) / H).clamp(min=0)
        N = layers[0][0].shape[0]
        R = torch.eye(N, dtype=torch.float64)
        for heads in layers:
            R = R + (sum((A.grad * A).clamp(min=0) for A in heads) / H) @ R
        attn = (sum(A for A in layers[-1]) / H)[rows, 1:].mean(0)
        gh, gw = visual.grid_size
        assert torch.allclose(fast["gradcam"][b], cam.detach().reshape(gh, gw), atol=1e-10)
        assert torch.allclose(fast["chefer"][b], R[rows, 1:].mean(0).detach().reshape(gh, gw), atol=1e-10)
        assert torch.allclose(fast["attention"][b], attn.detach().reshape(gh, gw), atol=1e-12)
    # not trivially zero (Grad-CAM's ReLU may blank one image: its head weights can all be negative)
    assert fast["chefer"].abs().min() > 0 and fast["gradcam"].abs().max() > 0


def test_decomposition_map_folds_the_text_into_the_readout(tmp_path):
    """The projected token maps equal the D-wide maps dotted with the direction (the dashboard's path)."""
    from compute.maths.decompose import Decomposer
    model = random_model("clip-atlas-shapes", torch.float64)
    g = torch.Generator().manual_seed(3)
    images = torch.randn(3, 3, 64, 64, generator=g, dtype=torch.float64)
    dirs = torch.randn(128, 2, generator=g, dtype=torch.float64)
    dec = Decomposer(model, token_layers=range(6))
    full, proj = dec(images).tokens, dec(images, token_directions=dirs).tokens
    assert proj.shape == full.shape[:-1] + (2,)
    assert torch.allclose(full @ dirs, proj, atol=1e-12)
