"""Per-class evaluation of heatmap methods against ground-truth masks (thesis §4.2-4.5)."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..methods import daam, linear
from ..metrics import iou_curve, thresholds
from ..optimize import OptimizedTokens, heatmaps
from ..record import Record
from .dataset import ThesisDataset

HeatmapFn = Callable[[Record, pd.Series], torch.Tensor]  # (record, manifest row) -> [H, W]


def heatmap_method(name: str, tokens: dict[str, OptimizedTokens] | None = None, pipe=None) -> HeatmapFn:
    """A heatmap function by name: "daam", "linear", or "optimized" (``tokens`` per class)."""
    if name == "daam":
        return lambda record, row: daam(record, row["word"])
    if name == "linear":
        return lambda record, row: linear(record, row["word"])
    if name == "optimized":
        if not tokens:
            raise ValueError("method 'optimized' needs tokens={class_name: OptimizedTokens}")

        def optimized(record: Record, row) -> torch.Tensor:
            found = tokens[row["class_name"]]
            return heatmaps(record, found.vectors, found.variant, pipe)[0]

        return optimized
    raise ValueError(f"unknown method {name!r}; use 'daam', 'linear' or 'optimized'")


def class_curves(
    dataset: ThesisDataset,
    method: HeatmapFn,
    taus: np.ndarray | None = None,
    exclude: dict[str, set[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Per class, the IoU(τ) curve of every image: {class: [images, taus]}.

    ``exclude[class]`` lists seeds to leave out (e.g. the images a token was trained on).
    """
    taus = thresholds() if taus is None else taus
    curves = {}
    for class_name in dataset.classes:
        rows = dataset.rows(class_name)
        skipped = (exclude or {}).get(class_name, set())
        per_image = [
            iou_curve(method(dataset.record(row), row), dataset.mask(row), taus)
            for _, row in rows.iterrows() if int(row["seed"]) not in skipped
        ]
        curves[class_name] = np.stack(per_image)
    return curves


def prompt_fidelity(shares: pd.DataFrame, min_share: float = 0.01) -> pd.Series:
    """Per class, the fraction of images in which the class covers at least ``min_share`` of the pixels."""
    return (shares["share"] >= min_share).groupby(shares["class_name"], sort=False).mean()
