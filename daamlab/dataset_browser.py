"""Browsing a dataset written by ``daamlab.datagen`` (notebook 07's ``generated/``), one sample at a time.

    from daamlab.dataset_browser import DatasetBrowser
    DatasetBrowser("papermill_runs/interactive/generated").widget     # display in JupyterLab

Each finished sample (``samples/<index>/`` with ``meta.json``, written last by the generator) is shown
as its image, its labels over the image (one colour per labelled word, dark grey background, white
where several words claim a pixel) and each labelled word's DAAM map over the image on the
D / max D scale of :class:`daamlab.widgets.HeatmapBrowser`. "previous" / "next" buttons, a sample
number box and a slider move between samples (the buttons and the box work from the keyboard: Tab
to them, Enter / Space or type a number). Unfinished samples (no ``meta.json``) are not listed.
ipywidgets is imported only when ``widget`` is first read.
"""

from __future__ import annotations

import html
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from daamlib.labels import BACKGROUND, UNCERTAIN

BACKGROUND_COLOR = (38, 38, 38)
UNCERTAIN_COLOR = (255, 255, 255)


def word_colors(count: int) -> list[tuple[int, int, int]]:
    """The colour of label 1..count (matplotlib's tab10 from its second colour, as ``plotting.label_grid``)."""
    from matplotlib import colormaps

    table = colormaps["tab10"](np.arange(1, 10))[:, :3]
    return [tuple(int(255 * c) for c in table[i % 9]) for i in range(count)]


def label_overlay(image: np.ndarray, labels: np.ndarray, count: int, alpha: float = 0.6) -> np.ndarray:
    """The labels (0 background, 1..count words, 255 uncertain) blended over a uint8 image [H, W, 3]."""
    colors = np.zeros((256, 3), float)
    colors[BACKGROUND] = BACKGROUND_COLOR
    colors[UNCERTAIN] = UNCERTAIN_COLOR
    for label, color in enumerate(word_colors(count), 1):
        colors[label] = color
    painted = colors[np.asarray(labels, np.uint8)]
    return np.uint8(np.clip((1 - alpha) * image + alpha * painted, 0, 255))


class DatasetBrowser:
    """The samples of a generated dataset; ``index`` is the position among the finished samples."""

    def __init__(self, out_dir: str | os.PathLike, display_size: int = 192) -> None:
        self.directory = Path(out_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"no dataset folder at {self.directory} ({self.directory.resolve()}); "
                                    "generate one with daamlab.datagen or notebook 07")
        self.folders = sorted(path.parent for path in self.directory.glob("samples/*/meta.json"))
        if not self.folders:
            raise FileNotFoundError(f"{self.directory} has no finished samples (samples/<index>/meta.json); "
                                    "generate them with daamlab.datagen or notebook 07")
        self.display_size = display_size
        self.index = 0
        self._widget = None

    def __len__(self) -> int:
        return len(self.folders)

    # -- one sample ------------------------------------------------------------------------------
    def meta(self, index: int | None = None) -> dict:
        return json.loads((self.folders[self.index if index is None else index] / "meta.json").read_text())

    def views(self, index: int | None = None) -> dict[str, np.ndarray]:
        """What the widget shows for a sample, by caption: the image, the labels, one DAAM map per word.
        A word whose map cannot be computed is left out (``errors`` names it)."""
        from daamlib.methods import daam
        from daamlib.metrics import to_mask_resolution
        from daamlib.record import load_record
        from daamlab.widgets import colorize, scaled

        folder = self.folders[self.index if index is None else index]
        meta = self.meta(index)
        image = np.asarray(Image.open(folder / "image.png").convert("RGB"))
        labels = np.asarray(Image.open(folder / "labels.png"))
        words = list(meta.get("words") or [])
        shown = {"image": image, "labels": label_overlay(image, labels, len(words))}
        self.errors: dict[str, str] = {}
        record_path = folder / "record.safetensors"
        record = load_record(record_path) if record_path.exists() else None
        for word in words:
            if record is None:
                self.errors[word] = f"no record at {record_path}"
                continue
            try:
                heatmap = to_mask_resolution(daam(record, word), image.shape[:2])
                shown[f"DAAM: {word}"] = colorize(image, scaled(heatmap).clamp(max=1).numpy())
            except (ValueError, KeyError) as error:
                self.errors[word] = str(error)
        return shown

    # -- moving ----------------------------------------------------------------------------------
    def go_to(self, index: int) -> None:
        if not 0 <= index < len(self.folders):
            raise IndexError(f"sample {index} is outside 0..{len(self.folders) - 1}")
        self.index = index
        if self._widget is not None:
            self.position.value = index  # linked: the slider follows, _refresh runs once
            self._refresh()

    def next(self) -> None:
        self.go_to(min(self.index + 1, len(self.folders) - 1))

    def previous(self) -> None:
        self.go_to(max(self.index - 1, 0))

    # -- the widget ----------------------------------------------------------------------------
    @property
    def widget(self):
        if self._widget is None:
            self._widget = self._build_widget()
            self._refresh()
        return self._widget

    def _build_widget(self):
        import ipywidgets as w

        last = len(self.folders) - 1
        self.previous_button = w.Button(description="◀ previous", tooltip="previous sample")
        self.next_button = w.Button(description="next ▶", tooltip="next sample")
        self.position = w.BoundedIntText(value=self.index, min=0, max=last, description="sample",
                                         layout=w.Layout(width="160px"))
        self.slider = w.IntSlider(value=self.index, min=0, max=last, description="", readout=False,
                                  continuous_update=False)
        w.link((self.position, "value"), (self.slider, "value"))
        self.previous_button.on_click(lambda _: self.previous())
        self.next_button.on_click(lambda _: self.next())
        self.position.observe(self._on_position, names="value")
        self.title = w.HTML()
        self.gallery = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        controls = w.HBox([self.previous_button, self.next_button, self.position, self.slider])
        return w.VBox([controls, self.title, self.gallery])

    def _on_position(self, change) -> None:
        if change["new"] != self.index:
            self.index = change["new"]
            self._refresh()

    def _refresh(self) -> None:
        if self._widget is None:
            return
        import ipywidgets as w

        meta = self.meta()
        views = self.views()
        words = list(meta.get("words") or [])
        legend = " ".join(f"<span style='background:rgb{color};color:#fff;padding:0 4px'>{html.escape(word)}</span>"
                          for word, color in zip(words, word_colors(len(words))))
        errors = "".join(f"<br><span style='color:#b00'>{html.escape(word)}: {html.escape(text)}</span>"
                         for word, text in self.errors.items())
        self.title.value = (f"<b>{self.index + 1}/{len(self.folders)}</b> · sample {meta.get('index')} · "
                            f"{html.escape(str(meta.get('prompt')))} (seed {meta.get('seed')}) · labels: {legend} "
                            f"<span style='color:#666'>(white: several words, grey: background; "
                            f"maps: D / max D)</span>{errors}")
        tiles = []
        for caption, array in views.items():
            height, width = array.shape[:2]
            size = (self.display_size * width // height, self.display_size)
            buffer = io.BytesIO()
            Image.fromarray(array).resize(size, Image.NEAREST if caption == "labels" else Image.BILINEAR).save(
                buffer, format="PNG")
            view = w.Image(value=buffer.getvalue(), format="png")
            tiles.append(w.VBox([w.HTML(f"<small>{html.escape(caption)}</small>"), view]))
        self.gallery.children = tiles
