"""Segmentation metrics for heatmaps (thesis §4.2-4.5).

A heatmap D becomes the mask D >= tau * max D after bicubic upsampling to the ground-truth
mask's (image) resolution. IoU is per image; a class's mIoU(tau) is the mean over its images.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .methods.resize import resize

DEFAULT_THRESHOLD_COUNT = 101


def thresholds(count: int = DEFAULT_THRESHOLD_COUNT) -> np.ndarray:
    """``count`` evenly spaced thresholds over [0, 1] (the thesis' sweep needs >= 101)."""
    if count < 2:
        raise ValueError("a threshold sweep needs at least 2 points")
    return np.linspace(0.0, 1.0, count)


def check_threshold(tau: float) -> None:
    if not 0.0 <= float(tau) <= 1.0:
        raise ValueError(f"threshold {tau} is outside [0, 1]; it is a fraction of the heatmap's maximum")


def normalize(heatmap: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1]; a constant map (e.g. all zeros) has nothing to scale and raises."""
    low, high = heatmap.min(), heatmap.max()
    if not torch.isfinite(high - low) or high - low <= 0:
        raise ValueError(
            "the heatmap is constant (all values equal, e.g. all zero), so it cannot be normalised; "
            "check that the word or token index attends anywhere, or that the record is not empty"
        )
    return (heatmap - low) / (high - low)


def binarize(heatmap: torch.Tensor, tau: float) -> torch.Tensor:
    """D >= tau * max D (thesis eq. 3.4)."""
    check_threshold(tau)
    return heatmap >= tau * heatmap.max()


def to_mask_resolution(heatmap: torch.Tensor, mask_shape: Sequence[int], upsample: str = "bicubic") -> torch.Tensor:
    """Upsample a latent heatmap [h, w] to a mask's [H, W], checking that the two agree in aspect."""
    h, w = heatmap.shape[-2:]
    H, W = mask_shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(
            f"mask of size {H}x{W} does not match a {h}x{w} heatmap: masks must be at the generated "
            "image's resolution (an integer multiple of the latent, same aspect ratio)"
        )
    return resize(heatmap.float(), (H, W), upsample)


def iou(predicted: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    predicted, target = _as_bool(predicted), _as_bool(target)
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {target.shape}")
    union = np.logical_or(predicted, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, target).sum() / union)


def iou_curve(
    heatmap: torch.Tensor, mask: np.ndarray | torch.Tensor, taus: np.ndarray | None = None, upsample: str = "bicubic"
) -> np.ndarray:
    """IoU of D >= tau * max D against ``mask`` for every tau.  [len(taus)]"""
    taus = thresholds() if taus is None else np.asarray(taus, dtype=float)
    for tau in (taus.min(), taus.max()):
        check_threshold(tau)
    target = _as_bool(mask)
    values = to_mask_resolution(heatmap, target.shape, upsample).numpy().ravel()
    target = target.ravel()
    order = np.argsort(-values, kind="stable")
    sorted_values, sorted_target = values[order], target[order]
    hits = np.concatenate([[0], np.cumsum(sorted_target)])  # target pixels among the top-n
    levels = taus * values.max()
    counts = np.searchsorted(-sorted_values, -levels, side="right")  # pixels with value >= level
    intersection = hits[counts]
    union = counts + target.sum() - intersection
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def summarize(curves: Mapping[str, np.ndarray], taus: np.ndarray | None = None) -> pd.DataFrame:
    """Per class (rows) and "All": max mIoU, its tau, AUC of mIoU(tau), images.

    ``curves[class]`` is [images, taus] of per-image IoU. "All" is the mean over classes.
    """
    if not curves:
        raise ValueError("no classes to summarise")
    rows = {}
    for name, per_image in curves.items():
        per_image = np.atleast_2d(np.asarray(per_image, dtype=float))
        grid = thresholds(per_image.shape[1]) if taus is None else np.asarray(taus)
        mean = per_image.mean(axis=0)
        rows[name] = {
            "max_miou": float(mean.max()),
            "best_tau": float(grid[mean.argmax()]),
            "auc": float(np.trapezoid(mean, grid)),
            "images": per_image.shape[0],
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["All"] = [table["max_miou"].mean(), np.nan, table["auc"].mean(), table["images"].sum()]
    return table


def curve_bands(per_image: np.ndarray, low: float = 5, high: float = 95) -> dict[str, np.ndarray]:
    """mIoU(tau) with the 5th/95th percentiles of per-image IoU (thesis Fig. 4.3)."""
    per_image = np.asarray(per_image, dtype=float)
    return {
        "mean": per_image.mean(axis=0),
        "low": np.percentile(per_image, low, axis=0),
        "high": np.percentile(per_image, high, axis=0),
    }


def pooled_iou(predicted: np.ndarray, target: np.ndarray, label_ids: Mapping[str, int]) -> dict[str, float]:
    """IoU per label over a whole set of label maps (pixels pooled over images), keyed by name;
    NaN for a label found in neither."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"label map shapes differ: {predicted.shape} vs {target.shape}")
    scores = {}
    for name, label in label_ids.items():
        union = np.logical_or(predicted == label, target == label).sum()
        scores[name] = float(np.logical_and(predicted == label, target == label).sum() / union) if union else float("nan")
    return scores


def pearson(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Pearson correlation of two maps (flattened); NaN when either is constant."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.size} vs {b.size}")
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _as_bool(mask) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool)
