"""An ipywidgets heatmap browser over one or many records.

    from daamlab.widgets import HeatmapBrowser
    HeatmapBrowser(records, pipe=pipe, tokens={"car": optimized}).widget   # display in JupyterLab

Methods: DAAM of a prompt token (SOT and EOT included), open-vocabulary and linear maps of any
typed phrase, and optimized tokens. It opens on the prompt's first word that is not a stop word
("car" in "a car in an urban environment"), not on "a".

One scale everywhere: the overlay shows D / max D (clamped at 0, colour bar below it), the τ slider
is a fraction of max D, and the mask is D >= τ·max D, so the mask is on exactly where the overlay
reaches τ on its colour bar. Layer and step filters apply to DAAM and open-vocabulary maps; the
layer list is wide enough for full module paths. When a setting cannot be shown (no phrase typed,
a word the record lacks, ...) the message says why and the views are blanked, so no old image
stands for the new request. The linear method is one mat-vec per new phrase (its text embedding
is cached), so typing feels instant.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from daamlib.methods import DAAM, HeatmapMethod, LinearDAAM, OpenVocabulary, OptimizedToken
from daamlib.metrics import binarize, to_mask_resolution
from daamlib.optimize import OptimizedTokens
from daamlib.record import Record

METHODS = ("DAAM", "open-vocabulary", "linear", "optimized")
# words the browser does not open on: articles, prepositions, conjunctions
STOP_WORDS = frozenset({"a", "an", "the", "in", "on", "of", "and", "or", "with", "to", "at", "by", "for", "from",
                        "into", "onto", "over", "under", "near", "is", "are", "its", "his", "her", "their", ","})
SCALE_LABEL = "D / max D"
BLANK_GREY = 200  # what the views show while the message reports an error


def default_token(tokens) -> int:
    """The token index a browser opens on: the first piece of the prompt's first word that is not a
    stop word (``STOP_WORDS``) and has a letter or digit; the first word when all are stop words,
    SOT for an empty prompt."""
    words = tokens.words
    for word in words:
        text = word.text.strip().lower()
        if text not in STOP_WORDS and any(ch.isalnum() for ch in text):
            return word.token_indices[0]
    return words[0].token_indices[0] if words else tokens.sot_index


def scaled(heatmap: torch.Tensor) -> torch.Tensor:
    """D / max D clamped at 0: the scale of the overlay, the colour bar and the τ slider."""
    peak = heatmap.max()
    if not torch.isfinite(peak) or peak <= 0:
        raise ValueError("the heatmap has no positive value, so D / max D is undefined; "
                         "check that the word attends anywhere")
    return (heatmap / peak).clamp(min=0)


def colorbar(tau: float, width: int = 256, height: int = 14, cmap: str = "jet") -> np.ndarray:
    """A horizontal colour bar of the overlay's scale, 0 (left) to 1 (right), with a white-black tick at τ."""
    from matplotlib import colormaps

    row = colormaps[cmap](np.linspace(0, 1, width))[:, :3] * 255
    bar = np.repeat(np.uint8(row)[None], height, axis=0)
    x = min(int(round(tau * (width - 1))), width - 1)
    bar[:, max(x - 1, 0) : x + 2] = 255
    bar[:, x] = 0
    return bar


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
        self.threshold = w.FloatSlider(value=0.4, min=0.0, max=1.0, step=0.01, description="τ (× max D)",
                                       style={"description_width": "initial"})
        longest = max(len(layer.name) for record in self.records for layer in record.cross_layers) if any(
            record.cross_layers for record in self.records) else 20
        # full module paths such as up_blocks.1.attentions.0.transformer_blocks.0.attn2 stay readable
        self.layers = w.SelectMultiple(description="layers", rows=6,
                                       layout=w.Layout(width=f"calc({longest + 4}ch + 100px)", min_width="300px"))
        self.steps = w.IntRangeSlider(description="steps")
        self.message = w.HTML()
        self.overlay_view = w.Image(format="png")
        self.overlay_view.add_class("daamlib-overlay")
        self.colorbar_view = w.Image(format="png")
        self.scale_label = w.HTML()
        self.mask_view = w.Image(format="png")
        self.mask_view.add_class("daamlib-mask")
        for name in ("record_select", "method", "token", "text", "optimized", "threshold", "layers", "steps", "message"):
            getattr(self, name).add_class(f"daamlib-{name.replace('_', '-')}")  # stable hooks for styling and browser tests
        self._refresh_record_controls()
        for control in (self.method, self.token, self.text, self.optimized, self.threshold, self.layers, self.steps):
            control.observe(self._on_change, names="value")
        self.record_select.observe(self._on_record, names="value")
        controls = w.VBox([self.record_select, self.method, self.token, self.text, self.optimized, self.threshold,
                           self.layers, self.steps, self.message], layout=w.Layout(flex="0 0 auto"))
        self.scale_label.layout = w.Layout(max_width=f"{max(display_size, 256)}px")
        views = w.VBox([w.HTML(f"overlay: {SCALE_LABEL}"), self.overlay_view, self.colorbar_view, self.scale_label,
                        self.mask_view], layout=w.Layout(align_items="flex-start"))  # images at their own size
        self.widget = w.HBox([controls, views], layout=w.Layout(flex_flow="row wrap"))
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
        self.token.value = default_token(tokens)
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
        size = (self.display_size * image.shape[1] // image.shape[0], self.display_size)  # (width, height)
        tau = self.threshold.value
        try:
            heatmap = self.compute().detach()
            upsampled = to_mask_resolution(heatmap, image.shape[:2])
            shown = scaled(upsampled).clamp(max=1).numpy()  # D / max D: the overlay's and the slider's scale
            mask = binarize(upsampled, tau).numpy()  # D >= τ·max D, i.e. shown >= τ
        except (ValueError, KeyError) as error:
            self._show_error(str(error), size)
            return
        self.message.value = ""
        self.current_heatmap = heatmap
        self.current_mask = mask
        self.overlay_view.value = _png(np.asarray(Image.fromarray(colorize(image, shown)).resize(size)))
        self.colorbar_view.value = _png(colorbar(tau, width=size[0]))
        self.scale_label.value = (f"<span style='font-size:small'>0 … {SCALE_LABEL} … 1; tick at τ = {tau:.2f}; "
                                  f"mask below: D ≥ τ·max D ({100 * mask.mean():.1f} % of the image)</span>")
        masked = np.where(self.current_mask[..., None], image, image // 4)
        self.mask_view.value = _png(np.asarray(Image.fromarray(masked).resize(size, Image.NEAREST)))

    def _show_error(self, text: str, size: tuple[int, int]) -> None:
        """Report why nothing is shown and blank the views, so the previous image is not taken for this request."""
        import html

        self.message.value = f"<span class='daamlib-error' style='color:#b00'>{html.escape(text)}</span>"
        self.current_heatmap = None
        self.current_mask = None
        blank = _png(np.full((size[1], size[0], 3), BLANK_GREY, np.uint8))
        self.overlay_view.value = blank
        self.mask_view.value = blank
        self.colorbar_view.value = _png(np.full((14, size[0], 3), BLANK_GREY, np.uint8))
        self.scale_label.value = "<span style='font-size:small;color:#888'>nothing shown: see the message</span>"

    def _on_change(self, change) -> None:
        self.update()

    def _on_record(self, change) -> None:
        self._refresh_record_controls()
        self.update()
