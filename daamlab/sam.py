"""Ground-truth masks for real models: Segment Anything prompted by each image's heatmap (thesis §4.1).

The thesis annotated its SD 2-base images with SAM and manual corrections. Here the class word's
DAAM heatmap gives SAM a box (around the pixels with D >= τ·max D) and a positive point (the
heatmap's maximum); the harness's mask review (``daamlab.review``) lets a person accept, reject
or re-prompt each mask with points.

    sam = load_sam("sam_vit_h_4b8939.pth")                 # vit_b / vit_l / vit_h, read from the checkpoint
    box, points = heatmap_prompt(daam(record, "car"), image.shape)
    mask = SamSegmenter(sam)(image, box, points, labels=np.ones(len(points), int))

``SamSegmenter`` runs SAM on CUDA when it is present (``device=`` to choose).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from daamlib.metrics import binarize, to_mask_resolution


# image-encoder (embed dim, depth) of each SAM release model
SAM_ENCODERS = {"vit_b": (768, 12), "vit_l": (1024, 24), "vit_h": (1280, 32)}
_PATCH_EMBED = "image_encoder.patch_embed.proj.weight"


def sam_model_type(state_dict: dict) -> str:
    """"vit_b", "vit_l" or "vit_h" from a SAM state dict's image encoder (embed dim and depth)."""
    if _PATCH_EMBED not in state_dict:
        raise ValueError(f"not a Segment Anything checkpoint (no {_PATCH_EMBED}); use a checkpoint of the SAM release "
                         "(sam_vit_b_01ec64.pth, sam_vit_l_0b3195.pth or sam_vit_h_4b8939.pth)")
    embed_dim = state_dict[_PATCH_EMBED].shape[0]
    blocks = {int(key.split(".")[2]) for key in state_dict if key.startswith("image_encoder.blocks.")}
    depth = max(blocks) + 1 if blocks else 0
    for name, shape in SAM_ENCODERS.items():
        if shape == (embed_dim, depth):
            return name
    raise ValueError(f"the checkpoint's image encoder (embed dim {embed_dim}, depth {depth}) matches no SAM model type "
                     f"({ {name: dict(zip(('embed_dim', 'depth'), shape)) for name, shape in SAM_ENCODERS.items()} })")


def load_sam(checkpoint: str | os.PathLike, model_type: str | None = None):
    """A Segment Anything model from a release checkpoint; ``model_type`` (vit_b / vit_l / vit_h) is read
    from the checkpoint when not given, and a given one must match it."""
    from segment_anything import sam_model_registry

    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no SAM checkpoint at {path.resolve()}; download one from the Segment Anything release")
    if model_type is not None and model_type not in SAM_ENCODERS:
        raise ValueError(f"SAM model type must be one of {list(SAM_ENCODERS)} or None (read from the checkpoint), not {model_type!r}")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    found = sam_model_type(state_dict)
    if model_type is not None and model_type != found:
        raise ValueError(f"{path.name} holds a {found} model, not {model_type}; pass model_type={found!r} or None")
    sam = sam_model_registry[found]()
    sam.load_state_dict(state_dict)
    return sam.eval()


def default_sam_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def heatmap_prompt(heatmap, image_shape, tau: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """A SAM box [x0, y0, x1, y1] around D >= τ·max D and the maximum as a point [[x, y]], at image resolution."""
    scaled = to_mask_resolution(heatmap, image_shape[:2])
    rows, cols = np.nonzero(binarize(scaled, tau).numpy())
    box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], dtype=float)
    peak_row, peak_col = np.unravel_index(int(scaled.argmax()), tuple(scaled.shape))
    return box, np.array([[peak_col, peak_row]], dtype=float)


class SamSegmenter:
    """SAM as a segmenter ``(image, box, points, labels) -> bool mask [H, W]`` (label 1 = object, 0 = background).

    The image embedding is computed once per image, so re-prompting the same image with more points is fast.
    SAM runs on ``device`` (default: CUDA when present, else the CPU)."""

    def __init__(self, sam_model, device: str | torch.device | None = None) -> None:
        from segment_anything import SamPredictor

        self.device = torch.device(device) if device is not None else default_sam_device()
        self.predictor = SamPredictor(sam_model.to(self.device).eval())
        self._image: np.ndarray | None = None

    def __call__(self, image: np.ndarray, box: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if self._image is None or self._image.shape != image.shape or not np.array_equal(self._image, image):
            self.predictor.set_image(image)
            self._image = image.copy()
        masks, scores, _ = self.predictor.predict(point_coords=np.asarray(points, float), point_labels=np.asarray(labels, int),
                                                  box=np.asarray(box, float), multimask_output=True)
        return masks[int(np.argmax(scores))].astype(bool)
