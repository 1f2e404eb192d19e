"""Downstream utility: is a segmenter trained on generated images with attention pseudo-labels any good?

The question the thesis leaves open. Generated images of one dataset get pseudo-labels from one
method each (DAAM masks, optimized-token masks, PCC labels); a small segmentation network is
trained on each set, and beside them on rendered toy scenes with their exact labels (same number of
images, same steps). All are evaluated on held-out rendered scenes, whose labels are exact.

Labels: 0 background, ``1 + i`` for ``classes[i]``, :data:`daamlib.labels.UNCERTAIN` (255) ignored
by the loss. Only the class of each image's prompt is labelled; other objects count as background,
as a dataset built from single-class prompts would label them.

Training is seeded end to end from one ``torch.Generator`` (initial weights, batch order, flips) and
runs on the CPU, whose kernels are deterministic: the same inputs and seed give the same network and
the same scores, and torch's global RNG is neither used nor changed.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from daamlib.labels import UNCERTAIN
from daamlib.metrics import pooled_iou
from daamlab.experiments.dataset import label_ids
from daamlab.toyworld import labels as L
from daamlab.toyworld.annotator import SegmentationNet, images_to_tensor, seeded_segmentation_net
from daamlab.toyworld.dataset import SceneSet

def scene_labels(scenes: SceneSet, classes: Sequence[str]) -> np.ndarray:
    """Exact labels of rendered scenes in the study's label space [N, H, W] (other train ids → background)."""
    labels = np.zeros(scenes.labels.shape, np.uint8)
    for name, label in label_ids(classes).items():
        if name != "background":
            labels[scenes.labels == L.IDS[name]] = label
    return labels


def train_segmenter(images: np.ndarray, labels: np.ndarray, num_labels: int, steps: int = 300, batch_size: int = 16,
                    learning_rate: float = 2e-3, channels: tuple[int, ...] = (16, 32, 64), seed: int = 0,
                    progress: bool = True) -> SegmentationNet:
    """Train the toy annotator's U-Net on images uint8 [N, H, W, 3] and labels uint8 [N, H, W] (255 ignored).

    Everything random (initial weights, batches, flips) comes from one generator seeded with ``seed``."""
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need one label map per image; got {len(images)} images and {len(labels)} label maps")
    if images.shape[:3] != labels.shape:
        raise ValueError(f"images {images.shape} and labels {labels.shape} differ in size; give one label per pixel")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, not {steps} and {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    pixels = images_to_tensor(images)  # [N, 3, H, W]
    targets = torch.from_numpy(labels.astype(np.int64))
    net = seeded_segmentation_net(channels, num_labels, generator).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate)
    for _ in tqdm(range(steps), desc="train segmenter", disable=not progress):
        batch = torch.randint(len(pixels), (batch_size,), generator=generator)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], pixels[batch].flip(-1), pixels[batch])
        y = torch.where(flip[:, None, None], targets[batch].flip(-1), targets[batch])
        loss = F.cross_entropy(net(x), y, ignore_index=UNCERTAIN)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval()


@torch.no_grad()
def evaluate_segmenter(net: SegmentationNet, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """IoU per class pooled over the evaluation set (0..1), and their mean under "mean"."""
    predicted = torch.cat([net(batch).argmax(dim=1) for batch in images_to_tensor(images).split(64)]).numpy()
    scores = pooled_iou(predicted, labels, {name: label for name, label in label_ids(classes).items() if name != "background"})
    scores["mean"] = float(np.nanmean([scores[name] for name in classes]))
    return scores


def run_downstream_study(images: np.ndarray, pseudo_labels: Mapping[str, np.ndarray], reference: SceneSet,
                         evaluation: SceneSet, classes: Sequence[str], steps: int = 300, batch_size: int = 16,
                         seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """One segmenter per pseudo-label source, plus one on ``reference`` scenes with exact labels; IoU in percent.

    Returns a table: rows = training source, columns = classes and "mean"."""
    sources = {name: (images, labels) for name, labels in pseudo_labels.items()}
    sources["rendered, exact labels"] = (reference.images, scene_labels(reference, classes))
    truth = scene_labels(evaluation, classes)
    rows = {}
    for name, (train_images, train_labels) in sources.items():
        net = train_segmenter(train_images, train_labels, 1 + len(classes), steps, batch_size, seed=seed, progress=progress)
        rows[name] = {key: 100 * value for key, value in evaluate_segmenter(net, evaluation.images, truth, classes).items()}
    return pd.DataFrame.from_dict(rows, orient="index")
