"""PCC self-attention segmentation over a dataset, scored against its ground-truth masks (notebook 08).

Each sample's prompt names one class; PCC labels its pixels with that class, the background or
"uncertain". Scores are the IoU of the class and of the background against the ground truth and
their mean (mIoU over the two labels, uncertain pixels counted as background), beside two
baselines: the class word's DAAM mask at τ, and "all background" (the trivial answer).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ..labels import heatmap_to_mask
from ..methods import daam
from ..metrics import iou
from ..pcc import PCCConfig, pcc_segment


def pcc_labels(dataset, pipe, config: PCCConfig = PCCConfig(), progress: bool = True) -> np.ndarray:
    """PCC labels uint8 [N, H, W]: 1 + the class index in ``dataset.classes``, 0 background, 255 uncertain.

    Records need ``trace(self_attention=True)`` and the class word as a context (or a query cache)."""
    classes = dataset.classes
    labels = []
    for _, row in tqdm(list(dataset.manifest.iterrows()), desc="PCC", disable=not progress):
        label = 1 + classes.index(row["class_name"])
        _, image_labels = pcc_segment(dataset.record(row), {label: row["word"]}, pipe, config)
        labels.append(image_labels)
    return np.stack(labels)


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU of the object, of the background, and their mean, for bool masks [H, W] (an empty union scores 1)."""
    scores = {"object_iou": iou(predicted, truth), "background_iou": iou(~predicted, ~truth)}
    scores["miou"] = (scores["object_iou"] + scores["background_iou"]) / 2
    return scores


def segmentation_scores(dataset, pcc: np.ndarray, tau: float = 0.4) -> pd.DataFrame:
    """Per sample and method (PCC, DAAM at τ, all background): object / background IoU and mIoU, in percent."""
    classes = dataset.classes
    rows = []
    for index, (_, row) in enumerate(dataset.manifest.iterrows()):
        truth = dataset.mask(row)
        record = dataset.record(row)
        predictions = {
            "PCC": pcc[index] == 1 + classes.index(row["class_name"]),
            f"DAAM (τ = {tau})": heatmap_to_mask(daam(record, row["word"]), truth.shape, "fixed", tau),
            "all background": np.zeros_like(truth),
        }
        for method, predicted in predictions.items():
            scores = {key: 100 * value for key, value in binary_scores(predicted, truth).items()}
            rows.append({"name": row["name"], "class_name": row["class_name"], "method": method, **scores})
    return pd.DataFrame(rows)
