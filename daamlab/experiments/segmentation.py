"""PCC self-attention segmentation over a dataset, scored against its ground-truth masks (notebook 08).

Each sample's prompt names one class; a method labels its pixels with that class (1 + its index in
``dataset.classes``), the background (0) or "uncertain" (255). Methods are compared by two scores:

* **semantic mIoU** (as Pascal VOC, where the PCC report was scored): IoU per label — background
  and every class — with pixels pooled over the whole dataset, and their mean. A predicted
  "uncertain" pixel matches no label.
* **binary mIoU** per image: the IoU of the prompt's class and of the background, and their mean
  (uncertain pixels counted as background); averaged per class.

Baselines beside PCC: the class word's DAAM mask at τ, "all background", and PCC with a single
cluster (the whole latent grid as one segment, classified by the same vote).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from daamlib.methods import DAAM
from daamlib.metrics import iou, pooled_iou
from daamlib.pcc import PCCConfig, pcc_segment
from daamlab.experiments.evaluation import masks_from_heatmaps

SINGLE_CLUSTER = PCCConfig(cluster_counts=(1,))


def class_label(dataset, row) -> int:
    """The label id of a sample's class (``dataset.label_ids``)."""
    return dataset.label_ids[row["class_name"]]


def pcc_labels(dataset, pipe, config: PCCConfig = PCCConfig(), progress: bool = True) -> np.ndarray:
    """PCC labels uint8 [N, H, W]: 1 + the class index in ``dataset.classes``, 0 background, 255 uncertain.

    Records need ``trace(self_attention=True)`` and the class word as a context (or a query cache); on SD3 and Flux,
    ConceptAttention's concepts (see ``families.pcc_trace_options``)."""
    labels = []
    for _, row in tqdm(list(dataset.manifest.iterrows()), desc="PCC", disable=not progress):
        _, image_labels = pcc_segment(dataset.record(row), {class_label(dataset, row): row["word"]}, pipe, config)
        labels.append(image_labels)
    return np.stack(labels)


def truth_labels(dataset) -> np.ndarray:
    """Ground truth as label maps uint8 [N, H, W]: 1 + the sample's class index on its mask, else 0."""
    return np.stack([np.where(dataset.mask(row), class_label(dataset, row), 0)
                     for _, row in dataset.manifest.iterrows()]).astype(np.uint8)


def baseline_labels(dataset, tau: float = 0.4) -> dict[str, np.ndarray]:
    """Label maps [N, H, W] of the class word's DAAM mask at τ and of the all-background answer."""
    daam_labels = masks_from_heatmaps(dataset, DAAM(), tau)
    return {f"DAAM (τ = {tau})": daam_labels, "all background": np.zeros_like(daam_labels)}


def semantic_scores(dataset, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """Pooled IoU (%) per label and their mean "mIoU"; rows = methods, columns = background, classes, mIoU."""
    truth = truth_labels(dataset)
    label_ids = dataset.label_ids
    rows = {}
    for method, predicted in predictions.items():
        scores = pooled_iou(predicted, truth, label_ids)
        rows[method] = {**{key: 100 * value for key, value in scores.items()}, "mIoU": 100 * np.nanmean(list(scores.values()))}
    return pd.DataFrame.from_dict(rows, orient="index")


def binary_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """IoU of the object, of the background, and their mean, for bool masks [H, W] (an empty union scores 1)."""
    scores = {"object_iou": iou(predicted, truth), "background_iou": iou(~predicted, ~truth)}
    scores["miou"] = (scores["object_iou"] + scores["background_iou"]) / 2
    return scores


def segmentation_scores(dataset, predictions: dict[str, np.ndarray]) -> pd.DataFrame:
    """Per sample and method: object / background IoU and their mean, in percent."""
    truth = truth_labels(dataset)
    rows = []
    for index, (_, row) in enumerate(dataset.manifest.iterrows()):
        label = class_label(dataset, row)
        for method, predicted in predictions.items():
            scores = binary_scores(predicted[index] == label, truth[index] == label)
            scores = {key: 100 * value for key, value in scores.items()}
            rows.append({"name": row["name"], "class_name": row["class_name"], "method": method, **scores})
    return pd.DataFrame(rows)
