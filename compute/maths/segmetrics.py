"""Zero-shot segmentation metrics, following the ImageNet-Segmentation protocol (Chefer et al. 2021).

For each image the continuous heatmap (already at the mask's size) is binarised at its own mean.
- pixel accuracy: correct pixels / all pixels, accumulated over the dataset;
- mIoU: the mean over the two classes (background, foreground) of total intersection / total union,
  both accumulated over the dataset (so large images weigh more, as in the protocol's code);
- mAP: the average precision of the continuous map ranking the foreground pixels, per image, then
  averaged over images (a constant map's AP is the foreground share; an image without foreground
  pixels has no AP and is left out of the mean).
- map_paper: the AP the papers' evaluation code computes, for digit-for-digit comparison with their tables: the
  map min-max normalised to [0, 1] per image, then one AP over both channels flattened together, the
  background channel (1 - map against the background mask) and the foreground channel (map against the
  foreground mask); averaged over images. A map that is constant over an image has no such AP (the
  normalisation divides by zero) and is left out of that mean.
"""
from __future__ import annotations

import numpy as np


def average_precision(scores: np.ndarray, target: np.ndarray) -> float:
    """AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, highest first (ties form one step)."""
    s = np.asarray(scores, np.float64).ravel()
    t = np.asarray(target, bool).ravel()
    positives = t.sum()
    if positives == 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]   # the last index of each run of equal scores
    tp = np.cumsum(t)[last]
    precision = tp / (last + 1)
    recall = tp / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def paper_average_precision(heat: np.ndarray, mask: np.ndarray) -> float:
    """The two-channel AP of the papers' code (see the module docstring); NaN for a constant map."""
    h = np.asarray(heat, np.float64).ravel()
    span = h.max() - h.min()
    if span <= 0:
        return float("nan")
    r = (h - h.min()) / span
    m = np.asarray(mask, bool).ravel()
    return average_precision(np.r_[1.0 - r, r], np.r_[~m, m])


class SegmentationScores:
    """Accumulates one method's metrics over images."""

    def __init__(self) -> None:
        self.correct = 0
        self.pixels = 0
        self.inter = np.zeros(2, np.int64)
        self.union = np.zeros(2, np.int64)
        self.aps: list[float] = []
        self.paper_aps: list[float] = []
        self.n = 0

    def add(self, heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        """Scores one image into the totals; returns its own figures (pixel_accuracy, iou_foreground, ap, ap_paper)."""
        if heat.shape != mask.shape:
            raise ValueError(f"heatmap {heat.shape} and mask {mask.shape} differ in size")
        mask = mask.astype(bool)
        self.n += 1
        pred = heat > heat.mean()
        correct = int((pred == mask).sum())
        self.correct += correct
        self.pixels += mask.size
        for c, (p, m) in enumerate(((~pred, ~mask), (pred, mask))):
            inter, union = int((p & m).sum()), int((p | m).sum())
            self.inter[c] += inter
            self.union[c] += union
        ap, ap_paper = average_precision(heat, mask), paper_average_precision(heat, mask)
        if not np.isnan(ap):
            self.aps.append(ap)
        if not np.isnan(ap_paper):
            self.paper_aps.append(ap_paper)
        # inter and union are the foreground's: the loop ends on it
        return {"pixel_accuracy": correct / mask.size, "iou_foreground": inter / union if union else float("nan"),
                "ap": ap, "ap_paper": ap_paper}

    @property
    def images(self) -> int:
        return self.n

    def result(self) -> dict[str, float]:
        iou = np.where(self.union > 0, self.inter / np.maximum(self.union, 1), 0.0)
        return {"pixel_accuracy": self.correct / self.pixels if self.pixels else float("nan"),
                "miou": float(iou.mean()) if self.pixels else float("nan"),
                "map": float(np.mean(self.aps)) if self.aps else float("nan"),
                "map_paper": float(np.mean(self.paper_aps)) if self.paper_aps else float("nan")}
