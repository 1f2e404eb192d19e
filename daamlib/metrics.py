"""Segmentation metrics for heatmaps (thesis §4.2-4.5).

A heatmap D becomes the mask D >= tau * max D after bicubic upsampling to the ground-truth
mask's (image) resolution. IoU is per image; a class's mIoU(tau) is the mean over its images.

Inputs are checked once per call (cheap, linear in the input) and a bad one raises with what to do:

* a **heatmap** is a real-valued ``torch.Tensor`` or ``np.ndarray`` [h, w] with finite values;
  integer heatmaps are read as float, boolean ones are refused (a boolean map is a mask).
  Thresholding (``binarize``, ``iou_curve``) needs a positive maximum: tau is a fraction of it.
* a **mask** is boolean, or numeric with values exactly 0 and 1 (any dtype, e.g. uint8 or
  float16). Soft masks (e.g. 0.1) and 0/255 image masks are refused rather than guessed at:
  threshold them first (``binarize(soft, tau)``, ``soft >= 0.5``, ``png > 127``).
* a **threshold** tau lies in [0, 1]; a list of thresholds is 1-D and not empty.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from .layout import resize

DEFAULT_THRESHOLD_COUNT = 101


def thresholds(count: int = DEFAULT_THRESHOLD_COUNT) -> np.ndarray:
    """``count`` evenly spaced thresholds over [0, 1] (the thesis' sweep needs >= 101)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise TypeError(f"the number of thresholds is an int (e.g. 101); got {count!r}")
    if count < 2:
        raise ValueError(f"a threshold sweep needs at least 2 points; got count={count}")
    return np.linspace(0.0, 1.0, count)


def check_threshold(tau: float) -> None:
    """Raise unless ``tau`` is one number in [0, 1] (NaN is not)."""
    if isinstance(tau, (bool, str, bytes)) or tau is None:
        raise TypeError(f"a threshold is a number in [0, 1]; got {tau!r} ({type(tau).__name__})")
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise TypeError(f"a threshold is one number in [0, 1]; got {type(tau).__name__}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold {tau} is outside [0, 1]; it is a fraction of the heatmap's maximum")


def normalize(heatmap: torch.Tensor) -> torch.Tensor:
    """Min-max scale to [0, 1] (any shape; a float tensor); a constant map (e.g. all zeros) has
    nothing to scale and raises, as do NaN/inf values."""
    heatmap = _heatmap_tensor(heatmap, ndim=None)
    low, high = heatmap.min(), heatmap.max()
    if high - low <= 0:
        raise ValueError("the heatmap is constant (all values equal, e.g. all zero), so it cannot be normalised; "
                         "check that the word or token index attends anywhere, or that the record is not empty")
    return (heatmap - low) / (high - low)


def binarize(heatmap: torch.Tensor, tau: float) -> torch.Tensor:
    """D >= tau * max D (thesis eq. 3.4): a bool tensor [h, w].

    ``heatmap`` is one map [h, w] (a stack would share one maximum: binarize each map); its
    maximum must be positive, since tau is a fraction of it (``normalize`` a signed map first)."""
    check_threshold(tau)
    heatmap = _heatmap_tensor(heatmap)
    return heatmap >= tau * _positive_max(heatmap)


def to_mask_resolution(heatmap: torch.Tensor, mask_shape: Sequence[int], upsample: str = "bicubic") -> torch.Tensor:
    """Upsample a latent heatmap [..., h, w] to a mask's [H, W], checking that the two agree in aspect.

    ``mask_shape`` is (H, W); for an image pass ``image.shape[:2]``."""
    heatmap = _heatmap_tensor(heatmap, ndim=None)
    if heatmap.ndim < 2:
        raise ValueError(f"a heatmap is [h, w]; got shape {list(heatmap.shape)}")
    mask_shape = tuple(int(size) for size in mask_shape)
    if len(mask_shape) != 2:
        raise ValueError(f"a mask shape is (H, W); got {mask_shape}. For an image or an RGB/palette mask pass "
                         "image.shape[:2], and turn a colour mask into one boolean mask per class first")
    h, w = heatmap.shape[-2:]
    H, W = mask_shape
    if H < h or W < w or H % h or W % w or H // h != W // w:
        raise ValueError(f"mask of size {H}x{W} does not match a {h}x{w} heatmap: masks must be at the generated "
                         "image's resolution (an integer multiple of the latent, same aspect ratio)")
    return resize(heatmap, (H, W), upsample)


def iou(predicted: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Intersection over union of two masks of the same shape (1.0 when both are empty).

    Masks are boolean or exactly 0/1; a soft mask raises (threshold it first)."""
    predicted, target = _mask_array(predicted, "predicted"), _mask_array(target, "target")
    if predicted.shape != target.shape:
        raise ValueError(f"mask shapes differ: {predicted.shape} vs {target.shape}")
    union = np.logical_or(predicted, target).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, target).sum() / union)


def iou_curve(heatmap: torch.Tensor, mask: np.ndarray | torch.Tensor, taus: np.ndarray | None = None,
              upsample: str = "bicubic") -> np.ndarray:
    """IoU of D >= tau * max D against ``mask`` for every tau.  [len(taus)]

    ``heatmap`` is one latent map [h, w] with a positive maximum, ``mask`` one boolean (or 0/1)
    mask [H, W] at image resolution, ``taus`` a non-empty 1-D sequence in [0, 1] (default: 101)."""
    taus = thresholds() if taus is None else _threshold_array(taus)
    target = _mask_array(mask, "mask")
    if target.ndim != 2:
        raise ValueError(f"the mask is one [H, W] map; got shape {list(target.shape)}. Pass one boolean mask per "
                         "image (for an RGB or palette mask, compare it with the class's colour or label first)")
    values = to_mask_resolution(_heatmap_tensor(heatmap).detach().cpu(), target.shape, upsample).numpy().ravel()
    peak = _positive_max(torch.from_numpy(values))  # after upsampling: the max the levels use
    target = target.ravel()
    order = np.argsort(-values, kind="stable")
    sorted_values, sorted_target = values[order], target[order]
    hits = np.concatenate([[0], np.cumsum(sorted_target)])  # target pixels among the top-n
    # each level computed exactly as binarize computes it (tau * max D in the heatmap's dtype)
    levels = np.array([(float(tau) * peak).item() for tau in taus], dtype=values.dtype)
    counts = np.searchsorted(-sorted_values, -levels, side="right")  # pixels with value >= level
    intersection = hits[counts]
    union = counts + target.sum() - intersection
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def summarize(curves: Mapping[str, np.ndarray], taus: np.ndarray | None = None) -> "pandas.DataFrame":
    """Per class (rows) and "All": max mIoU, its tau, AUC of mIoU(tau), images.

    ``curves[class]`` is [images, taus] of per-image IoU. "All" is the mean over classes.
    """
    if not curves:
        raise ValueError("no classes to summarise")
    grid_given = None if taus is None else _threshold_array(taus, increasing=True)
    rows = {}
    for name, per_image in curves.items():
        per_image = _curve_array(per_image, f"curves[{name!r}]")
        grid = thresholds(per_image.shape[1]) if grid_given is None else grid_given
        if len(grid) != per_image.shape[1]:
            raise ValueError(f"curves[{name!r}] has {per_image.shape[1]} thresholds per image but taus has {len(grid)}; "
                             "pass the taus the curves were computed with")
        mean = per_image.mean(axis=0)
        rows[name] = {"max_miou": float(mean.max()), "best_tau": float(grid[mean.argmax()]),
                      "auc": float(np.trapezoid(mean, grid)), "images": per_image.shape[0]}
    import pandas as pd  # only this table needs it: `import daamlib` stays light

    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["All"] = [table["max_miou"].mean(), np.nan, table["auc"].mean(), table["images"].sum()]
    return table


def curve_bands(per_image: np.ndarray, low: float = 5, high: float = 95) -> dict[str, np.ndarray]:
    """mIoU(tau) with the 5th/95th percentiles of per-image IoU (thesis Fig. 4.3); ``per_image`` is [images, taus]."""
    per_image = _curve_array(per_image, "per_image")
    if not 0 <= low <= high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100; got low={low}, high={high}")
    return {"mean": per_image.mean(axis=0), "low": np.percentile(per_image, low, axis=0),
            "high": np.percentile(per_image, high, axis=0)}


def pooled_iou(predicted: np.ndarray, target: np.ndarray, label_ids: Mapping[str, int]) -> dict[str, float]:
    """IoU per label over a whole set of label maps (pixels pooled over images), keyed by name;
    NaN for a label found in neither."""
    predicted, target = np.asarray(predicted), np.asarray(target)
    if predicted.shape != target.shape:
        raise ValueError(f"label map shapes differ: {predicted.shape} vs {target.shape}")
    if not label_ids:
        raise ValueError("no labels to score; pass label_ids as {name: label id}")
    scores = {}
    for name, label in label_ids.items():
        union = np.logical_or(predicted == label, target == label).sum()
        scores[name] = float(np.logical_and(predicted == label, target == label).sum() / union) if union else float("nan")
    return scores


def pearson(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Pearson correlation of two maps of the same shape (flattened); NaN when either is constant."""
    a, b = _numeric_array(a, "a"), _numeric_array(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {list(a.shape)} vs {list(b.shape)}; resize one to the other first "
                         "(e.g. metrics.to_mask_resolution)")
    if a.size < 2:
        raise ValueError(f"a correlation needs at least 2 values; the maps have {a.size}")
    for array, name in ((a, "a"), (b, "b")):
        if not np.isfinite(array).all():
            raise ValueError(f"map {name} has NaN or inf values; check how it was computed")
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# -- input checks (each is one pass over its input) ----------------------------------------------
def _numpy(value, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    if value is None or isinstance(value, (str, bytes, Mapping)):
        raise TypeError(f"{name} is an array or tensor; got {type(value).__name__}")
    return np.asarray(value)


def _numeric_array(value, name: str) -> np.ndarray:
    array = _numpy(value, name)
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be numeric; got dtype {array.dtype}")
    return array.astype(float)


def _mask_array(mask, name: str) -> np.ndarray:
    """A boolean array from a bool or exactly-0/1 mask; soft, 0/255 or empty masks raise."""
    array = _numpy(mask, name)
    if array.size == 0:
        raise ValueError(f"the {name} mask is empty (shape {list(array.shape)})")
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise TypeError(f"the {name} mask must be boolean or 0/1; got dtype {array.dtype}")
    zero, one = array == 0, array == 1
    if not (zero | one).all():
        raise ValueError(f"the {name} mask is not binary: {_describe_non_binary(array, zero | one)}")
    return one


def _describe_non_binary(array: np.ndarray, binary: np.ndarray) -> str:
    other = array[~binary]
    if array.dtype.kind in "iu" and (other == 255).all():
        return "its values are 0/255 (an 8-bit image); turn it into a boolean mask first, e.g. png > 127"
    return (f"{other.size} values are neither 0 nor 1 (e.g. {other[0].item():g}; range "
            f"{array.min().item():g}..{array.max().item():g}). Masks must be boolean or exactly 0/1: "
            "threshold a soft mask first, e.g. daamlib.binarize(soft, tau) or soft >= 0.5")


def _heatmap_tensor(heatmap, ndim: int | None = 2) -> torch.Tensor:
    """A finite floating tensor (integers become float32); bool, empty or NaN/inf maps raise."""
    if isinstance(heatmap, np.ndarray):
        heatmap = torch.from_numpy(np.ascontiguousarray(heatmap))
    elif not isinstance(heatmap, torch.Tensor):
        raise TypeError(f"a heatmap is a torch.Tensor or np.ndarray [h, w]; got {type(heatmap).__name__}")
    if heatmap.dtype == torch.bool or heatmap.is_complex():
        raise TypeError(f"a heatmap is real-valued; got dtype {heatmap.dtype}. "
                        "A boolean map is a mask: compare masks with iou()")
    if ndim is not None and heatmap.ndim != ndim:
        raise ValueError(f"expected one heatmap [h, w]; got shape {list(heatmap.shape)}. Pass one map at a time "
                         "(e.g. daamlib.daam(record, word), or maps[i] of a stack)")
    if heatmap.numel() == 0:
        raise ValueError(f"the heatmap is empty (shape {list(heatmap.shape)})")
    if not heatmap.is_floating_point():
        heatmap = heatmap.float()
    finite = torch.isfinite(heatmap)
    if not finite.all():
        raise ValueError(f"the heatmap has {int((~finite).sum())} NaN or inf values; check the record it came from "
                         "(e.g. a float16 overflow) or the method's inputs")
    return heatmap


def _positive_max(heatmap: torch.Tensor) -> torch.Tensor:
    peak = heatmap.max()
    if peak <= 0:
        raise ValueError(f"the heatmap's maximum is {float(peak):.4g}, not positive, so tau * max D is no fraction of a "
                         "peak (an all-zero map comes from an empty selection); check the word, layers and steps, or "
                         "min-max normalize a signed map first (daamlib.normalize)")
    return peak


def _threshold_array(taus, increasing: bool = False) -> np.ndarray:
    """A non-empty 1-D float array of thresholds in [0, 1] (strictly increasing when asked)."""
    array = _numpy(taus, "taus")
    if array.ndim == 0:
        raise ValueError(f"taus is a sequence of thresholds; got the single value {array!r} (wrap it: [tau])")
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"taus must be a non-empty 1-D sequence in [0, 1]; got shape {list(array.shape)}")
    if array.dtype.kind not in "iuf":
        raise TypeError(f"taus must be numbers in [0, 1]; got dtype {array.dtype}")
    array = array.astype(float)
    if not ((array >= 0) & (array <= 1)).all():  # NaN fails both
        bad = array[~((array >= 0) & (array <= 1))]
        raise ValueError(f"thresholds {bad.tolist()} are outside [0, 1]; tau is a fraction of the heatmap's maximum")
    if increasing and (np.diff(array) <= 0).any():
        raise ValueError("taus must be strictly increasing (the AUC integrates over them); sort them")
    return array


def _curve_array(per_image, name: str) -> np.ndarray:
    """Per-image IoU curves [images, taus] (one curve [taus] is one image), finite, in [0, 1]."""
    array = _numeric_array(per_image, name)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be per-image IoU curves [images, taus] with at least one image; "
                         f"got shape {list(array.shape)}")
    if not ((array >= 0) & (array <= 1)).all():  # NaN fails both
        raise ValueError(f"{name} has values outside [0, 1] or NaN; IoU curves come from iou_curve")
    return array
