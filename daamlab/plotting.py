"""Matplotlib figures of heatmaps and curves (thesis Figs. 3.1, 4.2-4.5)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from daamlib.metrics import curve_bands, normalize, thresholds, to_mask_resolution


def heatmap_at_image(heatmap: torch.Tensor, image_shape: Sequence[int]) -> np.ndarray:
    """A latent-resolution heatmap [h, w] upsampled to the image and scaled to [0, 1].  [H, W]"""
    return normalize(to_mask_resolution(heatmap, image_shape[:2])).numpy()


def overlay(ax, image: np.ndarray, heatmap: torch.Tensor | None = None, title: str | None = None,
            mask: np.ndarray | None = None, alpha: float = 0.5, cmap: str = "jet") -> None:
    """Draw ``image`` with a heatmap and/or a mask outline on ``ax``."""
    ax.imshow(image)
    if heatmap is not None:
        ax.imshow(heatmap_at_image(heatmap, image.shape), cmap=cmap, alpha=alpha, vmin=0, vmax=1)
    if mask is not None and np.any(mask):
        ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="white", linewidths=1)
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")


def token_grid(image: np.ndarray, maps: Mapping[str, torch.Tensor], columns: int = 6, size: float = 2.0):
    """The image followed by one overlay per label (thesis Fig. 3.1). Returns the figure."""
    import matplotlib.pyplot as plt

    panels = 1 + len(maps)
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    overlay(axes.flat[0], image, title="image")
    for ax, (label, heatmap) in zip(axes.flat[1:], maps.items()):
        overlay(ax, image, heatmap, title=label)
    figure.tight_layout()
    return figure


def miou_curves(ax, curves: Mapping[str, np.ndarray], title: str | None = None, bands: bool = True) -> None:
    """mIoU(τ) per class with 5th/95th-percentile bands (thesis Fig. 4.3)."""
    for name, per_image in curves.items():
        taus = thresholds(per_image.shape[1])
        band = curve_bands(per_image)
        line, = ax.plot(taus, band["mean"], label=name)
        if bands:
            ax.fill_between(taus, band["low"], band["high"], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("τ")
    ax.set_ylabel("mIoU")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)


def examples_grid(dataset, methods: Mapping, per_class: int = 2, seeds: Mapping[str, Sequence[int]] | None = None,
                  size: float = 1.8):
    """Rows: ``per_class`` images of each class; columns: ground truth, then one overlay per method
    (thesis Figs. 4.2 and 4.9). ``methods`` maps a label to a heatmap method (``attribute(record, word)``)."""
    import matplotlib.pyplot as plt

    chosen = []
    for class_name in dataset.classes:
        rows = dataset.rows(class_name)
        if seeds is not None and class_name in seeds:
            rows = rows[rows["seed"].isin(list(seeds[class_name]))]
        chosen += [row for _, row in rows.head(per_class).iterrows()]
    columns = 1 + len(methods)
    figure, axes = plt.subplots(len(chosen), columns, figsize=(size * columns, size * len(chosen)), squeeze=False)
    for r, row in enumerate(chosen):
        image, record = dataset.image(row), dataset.record(row)
        overlay(axes[r, 0], image, mask=dataset.mask(row), title=f"{row['class_name']} #{row['seed']} (GT)")
        for c, (label, method) in enumerate(methods.items(), 1):
            overlay(axes[r, c], image, method.attribute(record, row["word"]).heatmap, mask=dataset.mask(row), title=label)
    figure.tight_layout()
    return figure


def label_grid(images: Sequence[np.ndarray], label_maps: Mapping[str, Sequence[np.ndarray]],
               titles: Sequence[str] | None = None, size: float = 1.8):
    """Rows: images; columns: the image, then each named label map (0 background, 255 uncertain in white)."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    classes = plt.get_cmap("tab10")(np.arange(1, 10))
    palette = ListedColormap(np.vstack([[1, 1, 1, 1], [0.15, 0.15, 0.15, 1], classes]))  # uncertain, background, 1..9
    columns = 1 + len(label_maps)
    figure, axes = plt.subplots(len(images), columns, figsize=(size * columns, size * len(images)), squeeze=False)
    for r, image in enumerate(images):
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(titles[r] if titles else "image", fontsize=8)
        for c, (name, maps) in enumerate(label_maps.items(), 1):
            labels = np.asarray(maps[r]).astype(int)
            shown = np.where(labels == 255, 0, (labels - 1) % 9 + 2)  # palette index; background 0 -> 1
            shown = np.where(labels == 0, 1, shown)
            axes[r, c].imshow(image)
            axes[r, c].imshow(shown, cmap=palette, vmin=0, vmax=10, alpha=0.6, interpolation="nearest")
            axes[r, c].set_title(name, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    figure.tight_layout()
    return figure
