"""An ipywidgets heatmap browser over one or many records.

    from daamlib.widgets import HeatmapBrowser
    HeatmapBrowser(records, pipe=pipe, tokens={"car": optimized}).widget   # display in JupyterLab

Methods: DAAM of a prompt token (SOT and EOT included), open-vocabulary and linear maps of any
typed phrase, and optimized tokens. A threshold slider shows the binary mask D >= τ·max D; layer
and step filters apply to DAAM and open-vocabulary maps. The linear method is one mat-vec per
new phrase (its text embedding is cached), so typing feels instant.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .methods import DAAM, HeatmapMethod, LinearDAAM, OpenVocabulary, OptimizedToken
from .metrics import binarize, normalize, to_mask_resolution
from .optimize import OptimizedTokens
from .record import Record

METHODS = ("DAAM", "open-vocabulary", "linear", "optimized")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def colorize(image: np.ndarray, heatmap01: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] heatmap [H, W] over a uint8 image [H, W, 3] with a matplotlib colormap."""
    from matplotlib import colormaps

    colors = colormaps[cmap](heatmap01)[..., :3] * 255
    return np.uint8(np.clip((1 - alpha) * image + alpha * colors, 0, 255))


class HeatmapBrowser:
    """Interactive per-token heatmaps. ``current_heatmap`` / ``current_mask`` hold what is shown."""

    def __init__(self, records: Record | Sequence[Record], pipe=None,
                 tokens: Mapping[str, OptimizedTokens] | None = None, display_size: int = 256) -> None:
        import ipywidgets as w

        self.records = [records] if isinstance(records, Record) else list(records)
        if not self.records:
            raise ValueError("HeatmapBrowser needs at least one record")
        if any(record.image is None for record in self.records):
            raise ValueError("records need their images: create them with daamlib.generate (or set record.image)")
        self.pipe = pipe
        self.tokens = dict(tokens or {})
        self.display_size = display_size

        methods = [m for m in METHODS if self._method_available(m)]
        self.record_select = w.Dropdown(options=[(self._record_label(i), i) for i in range(len(self.records))],
                                        description="image")
        self.method = w.ToggleButtons(options=methods, description="method")
        self.token = w.Dropdown(description="token")
        self.text = w.Text(value="", description="phrase", placeholder="any word, e.g. tree", continuous_update=False)
        self.optimized = w.Dropdown(options=list(self.tokens), description="optimized")
        self.threshold = w.FloatSlider(value=0.4, min=0.0, max=1.0, step=0.01, description="τ")
        self.layers = w.SelectMultiple(description="layers", rows=6)
        self.steps = w.IntRangeSlider(description="steps")
        self.message = w.HTML()
        self.overlay_view = w.Image(format="png")
        self.mask_view = w.Image(format="png")
        self._refresh_record_controls()
        for control in (self.method, self.token, self.text, self.optimized, self.threshold, self.layers, self.steps):
            control.observe(self._on_change, names="value")
        self.record_select.observe(self._on_record, names="value")
        controls = w.VBox([self.record_select, self.method, self.token, self.text, self.optimized, self.threshold,
                           self.layers, self.steps, self.message])
        self.widget = w.HBox([controls, w.VBox([self.overlay_view, self.mask_view])])
        self.current_heatmap: torch.Tensor | None = None
        self.current_mask: np.ndarray | None = None
        self.update()

    # -- state -----------------------------------------------------------------------------------
    @property
    def record(self) -> Record:
        return self.records[self.record_select.value]

    def _record_label(self, index: int) -> str:
        record = self.records[index]
        return f"{index}: {record.meta.prompt or ''} (seed {record.meta.seed})"

    def _method_available(self, method: str) -> bool:
        first = self.records[0]
        return {"DAAM": bool(first.daam) or bool(first.daam_steps),
                "open-vocabulary": bool(first.queries) and self.pipe is not None,
                "linear": first.linear_matrix is not None and (self.pipe is not None or first.text_embeddings is not None),
                "optimized": bool(self.tokens)}[method]

    def _refresh_record_controls(self) -> None:
        record = self.record
        tokens = record.tokens
        self.token.options = [(tokens.label(i), i) for i in range(tokens.eot_index + 1)]
        self.token.value = 1 if tokens.eot_index > 1 else 0
        self.layers.options = [layer.name for layer in record.cross_layers]
        last = max(record.num_steps - 1, 0)
        self.steps.min, self.steps.max, self.steps.value = 0, last, (0, last)
        self.steps.disabled = not record.daam_steps and not record.queries

    # -- computing ---------------------------------------------------------------------------------
    def _filters(self) -> tuple[list[str] | None, list[int] | None]:
        layers = list(self.layers.value) or None
        first, last = self.steps.value
        full = (first, last) == (0, self.record.num_steps - 1)
        return layers, None if full or self.steps.disabled else list(range(first, last + 1))

    def chosen_method(self) -> tuple[HeatmapMethod, str | int]:
        """The method object and the word (or token index) the current settings ask for."""
        method = self.method.value
        layers, steps = self._filters()
        phrase = self.text.value.strip()
        if method == "DAAM":
            return DAAM(layers=layers, steps=steps), self.token.value
        if method in ("open-vocabulary", "linear") and not phrase:
            raise ValueError("type a phrase for the open-vocabulary and linear methods")
        if method == "open-vocabulary":
            return OpenVocabulary(self.pipe, phrase, layers=layers, steps=steps), phrase.split()[-1]
        if method == "linear":
            if layers or steps:
                raise ValueError("the linear matrix is collapsed over layers and steps; clear the filters")
            return LinearDAAM(self.pipe), phrase
        name = self.optimized.value
        return OptimizedToken({name: self.tokens[name]}, self.pipe), name

    def compute(self) -> torch.Tensor:
        """The heatmap [h, w] (latent resolution) for the current settings."""
        method, word = self.chosen_method()
        return method.attribute(self.record, word).heatmap

    def update(self) -> None:
        image = self.record.image
        try:
            heatmap = self.compute().detach()
            upsampled = to_mask_resolution(heatmap, image.shape[:2])
            heatmap01 = normalize(upsampled).numpy()  # for display
            mask = binarize(upsampled, self.threshold.value).numpy()  # D >= τ·max D
        except (ValueError, KeyError) as error:
            self.message.value = f"<span style='color:#b00'>{error}</span>"
            return
        self.message.value = ""
        self.current_heatmap = heatmap
        self.current_mask = mask
        size = (self.display_size, self.display_size * image.shape[1] // image.shape[0])
        self.overlay_view.value = _png(np.asarray(Image.fromarray(colorize(image, heatmap01)).resize(size[::-1])))
        masked = np.where(self.current_mask[..., None], image, image // 4)
        self.mask_view.value = _png(np.asarray(Image.fromarray(masked).resize(size[::-1], Image.NEAREST)))

    def _on_change(self, change) -> None:
        self.update()

    def _on_record(self, change) -> None:
        self._refresh_record_controls()
        self.update()
