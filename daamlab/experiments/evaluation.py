"""Per-class evaluation of heatmap methods against ground-truth masks (thesis §4.2-4.5)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from daamlib.methods import HeatmapMethod
from daamlib.labels import heatmap_to_mask
from daamlib.metrics import iou_curve, summarize, thresholds
from daamlib.record import Record
from daamlab.experiments.dataset import ThesisDataset


@dataclass
class Curves:
    """Per-image IoU(τ) curves by class: ``iou[class]`` is [images, taus]; ``seeds[class]`` names the images."""

    iou: dict[str, np.ndarray]
    seeds: dict[str, list[int]]

    def without_seeds(self, seeds_by_class: dict[str, set[int]]) -> "Curves":
        iou, seeds = {}, {}
        for name, curves in self.iou.items():
            keep = [i for i, seed in enumerate(self.seeds[name]) if seed not in seeds_by_class.get(name, set())]
            iou[name], seeds[name] = curves[keep], [self.seeds[name][i] for i in keep]
        return Curves(iou, seeds)

    def only_seeds(self, seeds_by_class: dict[str, set[int]]) -> "Curves":
        excluded = {name: set(self.seeds[name]) - set(seeds_by_class.get(name, set())) for name in self.iou}
        return self.without_seeds(excluded)

    def summary(self) -> pd.DataFrame:
        return summarize(self.iou)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, seeds=json.dumps(self.seeds), **{f"iou/{name}": value for name, value in self.iou.items()})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Curves":
        with np.load(path) as data:
            seeds = json.loads(str(data["seeds"]))
            return cls({name: data[f"iou/{name}"] for name in seeds}, seeds)


def class_curves(dataset: ThesisDataset, method: HeatmapMethod, taus: np.ndarray | None = None,
                 records: Callable[[pd.Series], Record] | None = None) -> Curves:
    """IoU(τ) of every image of every class for the class word's map by ``method``.
    ``records`` overrides how a row's record is loaded."""
    taus = thresholds() if taus is None else taus
    load = records or dataset.record
    iou, seeds = {}, {}
    for class_name in dataset.classes:
        rows = dataset.rows(class_name)
        iou[class_name] = np.stack([iou_curve(method.attribute(load(row), row["word"]).heatmap, dataset.mask(row), taus) for _, row in rows.iterrows()])
        seeds[class_name] = [int(seed) for seed in rows["seed"]]
    return Curves(iou, seeds)


def prompt_fidelity(shares: pd.DataFrame, min_share: float = 0.01) -> pd.Series:
    """Per class, the fraction of images in which the class covers at least ``min_share`` of the pixels."""
    return (shares["share"] >= min_share).groupby(shares["class_name"], sort=False).mean()


def masks_from_heatmaps(dataset, method: HeatmapMethod, tau: float = 0.4) -> np.ndarray:
    """Pseudo-labels [N, H, W] from a heatmap method: D >= τ·max D of the class word is the prompt's class."""
    labels = []
    for _, row in dataset.manifest.iterrows():
        record = dataset.record(row)
        mask = heatmap_to_mask(method.attribute(record, row["word"]).heatmap, record.image_size, "fixed", tau)
        labels.append(np.where(mask, dataset.label_ids[row["class_name"]], 0).astype(np.uint8))
    return np.stack(labels)
