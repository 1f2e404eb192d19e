"""Ground-truth masks for real models: Segment Anything prompted by each image's heatmap (thesis §4.1).

The thesis annotated its SD 2-base images with SAM and manual corrections. Here the class word's
DAAM heatmap gives SAM a box (around the pixels with D >= τ·max D) and a positive point (the
heatmap's maximum); masks can then be reviewed (accepted, rejected, or re-prompted with points).

    from segment_anything import sam_model_registry
    sam = sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth")   # weights from the SAM release
    masks = sam_masks(dataset, sam)
"""

from __future__ import annotations

import numpy as np

from .io import save_png
from .methods import daam
from .metrics import binarize, to_mask_resolution


def heatmap_prompt(heatmap, image_shape, tau: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """A SAM box [x0, y0, x1, y1] around D >= τ·max D and the maximum as a point [[x, y]], at image resolution."""
    scaled = to_mask_resolution(heatmap, image_shape[:2])
    rows, cols = np.nonzero(binarize(scaled, tau).numpy())
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)
    peak_row, peak_col = np.unravel_index(int(scaled.argmax()), tuple(scaled.shape))
    return box, np.array([[peak_col, peak_row]], dtype=float)


def sam_mask(predictor, image: np.ndarray, box: np.ndarray, points: np.ndarray, point_labels: np.ndarray | None = None) -> np.ndarray:
    """SAM's best mask bool [H, W] for one box and its points (label 1 = object, 0 = background)."""
    predictor.set_image(image)
    labels = np.ones(len(points), dtype=int) if point_labels is None else np.asarray(point_labels)
    masks, scores, _ = predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=True)
    return masks[int(np.argmax(scores))].astype(bool)


def sam_masks(dataset, sam_model, tau: float = 0.4) -> dict[str, np.ndarray]:
    """Propose a mask per sample from its class word's DAAM map; writes them as the dataset's masks."""
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam_model)
    proposals = {}
    for _, row in dataset.manifest.iterrows():
        image = dataset.image(row)
        box, points = heatmap_prompt(daam(dataset.record(row), row["word"]), image.shape, tau)
        mask = sam_mask(predictor, image, box, points)
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        proposals[row["name"]] = mask
    return proposals
