"""From heatmaps to segmentation labels: masks, polygons, boxes, and COCO / YOLO-seg / PNG export.

The threshold is always chosen explicitly: a fixed τ (the mask is D >= τ·max D, as in the thesis)
or Otsu's threshold of the normalised heatmap (scikit-image). COCO output is validated by loading
it with ``pycocotools``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from skimage import filters, measure, morphology

from .io import atomic_path, write_text
from .metrics import binarize, check_threshold, normalize, to_mask_resolution

ThresholdMethod = Literal["fixed", "otsu"]
UNCERTAIN = 255  # semantic PNG value for pixels no label is sure about
BACKGROUND = 0


def heatmap_to_mask(heatmap: torch.Tensor, image_shape: Sequence[int], method: ThresholdMethod, tau: float | None = None) -> np.ndarray:
    """A latent heatmap [h, w] → boolean mask [H, W] at image resolution (bicubic upsampling)."""
    upsampled = to_mask_resolution(heatmap, image_shape[:2])
    if method == "fixed":
        if tau is None:
            raise ValueError("method='fixed' needs tau= (the mask is D >= tau * max D, tau in [0, 1])")
        return binarize(upsampled, tau).numpy()
    scaled = normalize(upsampled).numpy()
    if method == "otsu":
        if tau is not None:
            raise ValueError("method='otsu' computes its own threshold; drop tau=")
        return scaled >= filters.threshold_otsu(scaled)
    raise ValueError(f"threshold method must be 'fixed' or 'otsu', not {method!r}")


def clean_mask(mask: np.ndarray, min_area: int = 16, closing_radius: int = 1) -> np.ndarray:
    """Close small gaps, fill holes and drop components smaller than ``min_area`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if closing_radius > 0:
        mask = morphology.closing(mask, morphology.disk(closing_radius))
    mask = morphology.remove_small_holes(mask, max_size=min_area)
    return morphology.remove_small_objects(mask, max_size=min_area - 1) if min_area > 1 else mask


def instances(mask: np.ndarray, connectivity: int = 2) -> list[np.ndarray]:
    """The connected components of a mask, largest first."""
    labelled = measure.label(np.asarray(mask, dtype=bool), connectivity=connectivity)
    components = [labelled == index for index in range(1, labelled.max() + 1)]
    return sorted(components, key=lambda component: -int(component.sum()))


def mask_to_polygons(mask: np.ndarray, tolerance: float = 0.5) -> list[np.ndarray]:
    """Outer contours of a mask as polygons [k, 2] of (x, y) pixel-corner coordinates."""
    padded = np.pad(np.asarray(mask, dtype=float), 1)
    contours = [measure.approximate_polygon(c, tolerance) - 1 for c in measure.find_contours(padded, 0.5)]  # unpadded
    return [contour[:, ::-1] + 0.5 for contour in contours if len(contour) >= 3]  # (row, column) -> (x, y)


def polygons_to_mask(polygons: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
    """Rasterise polygons as COCO does (``pycocotools``), for round trips and checks."""
    from pycocotools import mask as coco_mask

    height, width = shape[:2]
    flat = [np.asarray(p, dtype=float).ravel().tolist() for p in polygons]
    if not flat:
        return np.zeros((height, width), bool)
    rles = coco_mask.frPyObjects(flat, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


def mask_to_box(mask: np.ndarray) -> list[float]:
    """COCO box [x, y, width, height] of a non-empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        raise ValueError("the mask is empty: it has no box")
    return [float(cols.min()), float(rows.min()), float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]


@dataclass
class LabelledImage:
    """One image's labels: its file name, size, and (category, instance mask) pairs."""

    file_name: str
    height: int
    width: int
    objects: list[tuple[str, np.ndarray]]


def to_coco(images: Sequence[LabelledImage], categories: Sequence[str], tolerance: float = 0.5) -> dict:
    """A COCO instances dictionary with polygon segmentations, boxes and areas."""
    category_ids = {name: index + 1 for index, name in enumerate(categories)}
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category_ids.items()]}
    for image_id, image in enumerate(images, 1):
        coco["images"].append({"id": image_id, "file_name": image.file_name, "height": image.height, "width": image.width})
        for category, mask in image.objects:
            if category not in category_ids:
                raise ValueError(f"category {category!r} is not among {list(categories)}")
            polygons = mask_to_polygons(mask, tolerance)
            if not polygons:
                continue
            coco["annotations"].append({
                "id": len(coco["annotations"]) + 1, "image_id": image_id, "category_id": category_ids[category],
                "segmentation": [p.ravel().round(2).tolist() for p in polygons], "area": float(np.sum(mask)),
                "bbox": mask_to_box(mask), "iscrowd": 0,
            })
    return coco


def write_coco(path: str | os.PathLike, images: Sequence[LabelledImage], categories: Sequence[str]) -> Path:
    """Write COCO JSON and check that ``pycocotools`` indexes it."""
    from pycocotools.coco import COCO

    path = Path(path)
    write_text(path, json.dumps(to_coco(images, categories)))
    COCO(str(path))  # raises on a malformed file
    return path


def yolo_segmentation_lines(image: LabelledImage, categories: Sequence[str], tolerance: float = 0.5) -> list[str]:
    """YOLO-seg lines: ``class x1 y1 x2 y2 ...`` with coordinates normalised to [0, 1]."""
    lines = []
    for category, mask in image.objects:
        for polygon in mask_to_polygons(mask, tolerance):
            coords = polygon / np.array([image.width, image.height])
            lines.append(" ".join([str(categories.index(category)), *[f"{v:.6f}" for v in coords.ravel()]]))
    return lines


def write_yolo(directory: str | os.PathLike, images: Sequence[LabelledImage], categories: Sequence[str]) -> Path:
    """One ``.txt`` per image at the image's relative path (``a/b.png`` → ``a/b.txt``) and a ``classes.txt``."""
    directory = Path(directory)
    for image in images:
        write_text(directory / Path(image.file_name).with_suffix(".txt"), "\n".join(yolo_segmentation_lines(image, categories)))
    write_text(directory / "classes.txt", "\n".join(categories))
    return directory


def semantic_map(heatmaps: Mapping[int, np.ndarray], sure: float, unsure: float) -> np.ndarray:
    """Label map uint8 [H, W] from normalised heatmaps {label: [H, W] in [0, 1]}.

    A pixel gets the label of its strongest heatmap when that is >= ``sure``, background (0) when
    every heatmap is < ``unsure``, and UNCERTAIN (255) in between.
    """
    for tau in (sure, unsure):
        check_threshold(tau)
    if unsure > sure:
        raise ValueError(f"unsure ({unsure}) must not exceed sure ({sure})")
    if not heatmaps or any(label in (BACKGROUND, UNCERTAIN) for label in heatmaps):
        raise ValueError(f"give at least one label, none of them {BACKGROUND} (background) or {UNCERTAIN} (uncertain)")
    labels = np.array(list(heatmaps))
    stacked = np.stack([np.asarray(heatmaps[label]) for label in labels])  # [k, H, W]
    strongest, best = stacked.max(axis=0), labels[stacked.argmax(axis=0)]
    result = np.full(strongest.shape, UNCERTAIN, np.uint8)
    result[strongest >= sure] = best[strongest >= sure]
    result[strongest < unsure] = BACKGROUND
    return result


def write_semantic_png(path: str | os.PathLike, label_map: np.ndarray, palette: Mapping[int, Sequence[int]] | None = None) -> Path:
    """A palette PNG whose pixel values are the labels (255 = uncertain, shown white)."""
    path = Path(path)
    image = Image.fromarray(np.asarray(label_map, dtype=np.uint8), mode="P")
    colors = np.zeros((256, 3), np.uint8)
    rng = np.random.default_rng(0)
    colors[1:255] = rng.integers(40, 255, (254, 3))
    colors[UNCERTAIN] = 255
    for label, color in (palette or {}).items():
        colors[label] = color
    image.putpalette(colors.ravel().tolist())
    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG")
    return path
