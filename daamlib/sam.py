"""Ground-truth masks for real models: Segment Anything prompted by each image's heatmap (thesis §4.1).

The thesis annotated its SD 2-base images with SAM and manual corrections. Here the class word's
DAAM heatmap gives SAM a box (around the pixels with D >= τ·max D) and a positive point (the
heatmap's maximum); :class:`daamlib.review.MaskReview` then lets a person accept, reject or
re-prompt each mask with points.

    from segment_anything import sam_model_registry
    sam = sam_model_registry["vit_h"](checkpoint="sam_vit_h_4b8939.pth")   # weights from the SAM release
    masks = sam_masks(dataset, SamSegmenter(sam))          # or: MaskReview(dataset, SamSegmenter(sam)).widget
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


class SamSegmenter:
    """SAM as a segmenter ``(image, box, points, labels) -> bool mask [H, W]`` (label 1 = object, 0 = background).

    The image embedding is computed once per image, so re-prompting the same image with more points is fast."""

    def __init__(self, sam_model) -> None:
        from segment_anything import SamPredictor

        self.predictor = SamPredictor(sam_model)
        self._image: np.ndarray | None = None

    def __call__(self, image: np.ndarray, box: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if self._image is None or self._image.shape != image.shape or not np.array_equal(self._image, image):
            self.predictor.set_image(image)
            self._image = image.copy()
        masks, scores, _ = self.predictor.predict(point_coords=np.asarray(points, float), point_labels=np.asarray(labels, int),
                                                  box=np.asarray(box, float), multimask_output=True)
        return masks[int(np.argmax(scores))].astype(bool)


def sam_masks(dataset, segmenter, tau: float = 0.4) -> dict[str, np.ndarray]:
    """Propose a mask per sample from its class word's DAAM map and write it as the dataset's mask
    (no review; see :class:`daamlib.review.MaskReview` for that)."""
    proposals = {}
    for _, row in dataset.manifest.iterrows():
        image = dataset.image(row)
        box, points = heatmap_prompt(daam(dataset.record(row), row["word"]), image.shape, tau)
        mask = segmenter(image, box, points, np.ones(len(points), int))
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        proposals[row["name"]] = mask
    return proposals
