"""Reviewing proposed ground-truth masks, one sample at a time: accept, reject, or add points.

The thesis annotated its images with SAM and corrected them by hand. ``MaskReview`` does the same
over a :class:`~daamlab.experiments.ThesisDataset`: each sample starts from the prompt its class
word's DAAM heatmap gives (a box around D >= τ·max D and a positive point at the maximum); added
object / background points re-prompt the segmenter. Decisions are saved as they are made
(accepted masks as the dataset's mask PNGs, every decision in ``mask_review.json``), so closing
the notebook loses nothing and reopening resumes at the first undecided sample.

    from daamlab.sam import SamSegmenter, load_sam
    review = MaskReview(dataset, SamSegmenter(load_sam("sam_vit_b_01ec64.pth")))  # model type read from the checkpoint
    review.widget                     # display in JupyterLab
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import numpy as np
from PIL import Image

from daamlab.io import save_png, write_json
from daamlib.methods import daam
from daamlab.sam import heatmap_prompt

Status = Literal["pending", "accepted", "rejected"]
# (image uint8 [H, W, 3], box [x0, y0, x1, y1], points [k, 2] as (x, y), labels [k] 1/0) -> bool [H, W]
Segmenter = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
DECISIONS_FILE = "mask_review.json"
_POINT_COLORS = {1: (0, 255, 0), 0: (255, 0, 0)}  # object, background


@dataclass
class Decision:
    """A sample's review: its status and the points added to the heatmap's own prompt."""

    status: Status = "pending"
    points: list[list[float]] = field(default_factory=list)  # [[x, y], ...] at image resolution
    labels: list[int] = field(default_factory=list)  # 1 = object, 0 = background


class MaskReview:
    """Accept / reject / re-prompt masks for every sample of a dataset; ``current_mask`` is what is shown."""

    def __init__(self, dataset, segmenter: Segmenter, tau: float = 0.4, display_size: int = 256) -> None:
        if not 0 <= tau <= 1:
            raise ValueError(f"tau must lie in [0, 1], not {tau}")
        self.dataset, self.segmenter, self.tau, self.display_size = dataset, segmenter, tau, display_size
        self.names = list(dataset.manifest["name"])
        if not self.names:
            raise ValueError("the dataset has no samples to review")
        self.path = dataset.directory / DECISIONS_FILE
        saved = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.decisions = {name: Decision(**saved[name]) if name in saved else Decision() for name in self.names}
        self.index = next((i for i, name in enumerate(self.names) if self.decisions[name].status == "pending"), 0)
        self.current_mask: np.ndarray | None = None
        self._widget = None
        self._load()

    # -- what is shown ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.names[self.index]

    @property
    def decision(self) -> Decision:
        return self.decisions[self.name]

    def prompt(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The box, points and labels given to the segmenter: the heatmap's, then the added ones."""
        points = np.concatenate([self._peak, np.asarray(self.decision.points, float).reshape(-1, 2)])
        labels = np.concatenate([[1], np.asarray(self.decision.labels, int)]).astype(int)
        return self._box, points, labels

    def _load(self) -> None:
        row = self.dataset.manifest.iloc[self.index]
        self.image = self.dataset.image(row)
        heatmap = daam(self.dataset.record(row), row["word"])
        self._box, self._peak = heatmap_prompt(heatmap, self.image.shape, self.tau)
        self._segment()

    def _segment(self) -> None:
        mask = np.asarray(self.segmenter(self.image, *self.prompt()), bool)
        if mask.shape != self.image.shape[:2]:
            raise ValueError(f"the segmenter returned a {mask.shape} mask for a {self.image.shape[:2]} image")
        self.current_mask = mask
        self._refresh()

    # -- actions -----------------------------------------------------------------------------------
    def add_point(self, x: float, y: float, positive: bool = True) -> None:
        """Add an object (``positive``) or background point at pixel (x, y) and re-prompt."""
        height, width = self.image.shape[:2]
        if not (0 <= x < width and 0 <= y < height):
            raise ValueError(f"point ({x}, {y}) lies outside the {width}x{height} image")
        self.decision.points.append([float(x), float(y)])
        self.decision.labels.append(int(positive))
        self._segment()

    def reset(self) -> None:
        """Drop the added points: back to the heatmap's own prompt."""
        self.decisions[self.name] = Decision()
        self._segment()

    def accept(self) -> None:
        """Save the shown mask as the sample's ground truth and move to the next sample."""
        row = self.dataset.manifest.iloc[self.index]
        save_png(np.uint8(self.current_mask) * 255, self.dataset.directory / row["mask"])
        self._decide("accepted")

    def reject(self) -> None:
        """Mark the sample as having no usable mask (annotate it elsewhere and import_masks)."""
        row = self.dataset.manifest.iloc[self.index]
        (self.dataset.directory / row["mask"]).unlink(missing_ok=True)
        self._decide("rejected")

    def go_to(self, index: int) -> None:
        if not 0 <= index < len(self.names):
            raise IndexError(f"sample {index} is outside 0..{len(self.names) - 1}")
        self.index = index
        self._load()

    def _decide(self, status: Status) -> None:
        self.decision.status = status
        write_json(self.path, {name: asdict(decision) for name, decision in self.decisions.items()})
        if self.index + 1 < len(self.names):
            self.go_to(self.index + 1)
        else:
            self._refresh()

    @property
    def counts(self) -> dict[str, int]:
        statuses = [decision.status for decision in self.decisions.values()]
        return {status: statuses.count(status) for status in ("accepted", "rejected", "pending")}

    # -- the widget ----------------------------------------------------------------------------
    def overlay(self) -> np.ndarray:
        """The image with the mask tinted and the prompt drawn (box, green object and red background points)."""
        shown = np.where(self.current_mask[..., None], (0.5 * self.image + [0, 90, 160]).clip(0, 255), self.image // 2)
        shown = shown.astype(np.uint8)
        x0, y0, x1, y1 = np.round(self._box).astype(int)
        shown[[y0, y1], x0 : x1 + 1] = 255
        shown[y0 : y1 + 1, [x0, x1]] = 255
        _, points, labels = self.prompt()
        for (x, y), label in zip(np.round(points).astype(int), labels):
            shown[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = _POINT_COLORS[int(label)]
        return shown

    @property
    def widget(self):
        if self._widget is None:
            self._widget = self._build_widget()
            self._refresh()
        return self._widget

    def _build_widget(self):
        import ipywidgets as w

        self.view = w.Image(format="png")
        self.status = w.HTML()
        self.x = w.BoundedIntText(description="x", min=0, max=self.image.shape[1] - 1)
        self.y = w.BoundedIntText(description="y", min=0, max=self.image.shape[0] - 1)
        self.point_kind = w.ToggleButtons(options=[("object", True), ("background", False)])
        buttons = {label: w.Button(description=label) for label in ("accept", "reject", "add point", "reset", "previous", "next")}
        buttons["accept"].on_click(lambda _: self.accept())
        buttons["reject"].on_click(lambda _: self.reject())
        buttons["add point"].on_click(lambda _: self.add_point(self.x.value, self.y.value, self.point_kind.value))
        buttons["reset"].on_click(lambda _: self.reset())
        buttons["previous"].on_click(lambda _: self.go_to(max(self.index - 1, 0)))
        buttons["next"].on_click(lambda _: self.go_to(min(self.index + 1, len(self.names) - 1)))
        self.buttons = buttons
        return w.HBox([
            self.view,
            w.VBox([self.status, w.HBox([buttons["accept"], buttons["reject"]]), self.point_kind,
                    w.HBox([self.x, self.y]), w.HBox([buttons["add point"], buttons["reset"]]),
                    w.HBox([buttons["previous"], buttons["next"]])]),
        ])

    def _refresh(self) -> None:
        if self._widget is None:
            return
        height, width = self.image.shape[:2]
        size = (self.display_size * width // height, self.display_size)
        buffer = io.BytesIO()
        Image.fromarray(self.overlay()).resize(size, Image.NEAREST).save(buffer, format="PNG")
        self.view.value = buffer.getvalue()
        counts = self.counts
        self.status.value = (f"<b>{self.name}</b> ({self.index + 1}/{len(self.names)}): {self.decision.status}; "
                             f"{counts['accepted']} accepted, {counts['rejected']} rejected, {counts['pending']} pending")


def sam_masks(dataset, segmenter, tau: float = 0.4) -> dict[str, np.ndarray]:
    """Propose a mask per sample from its class word's DAAM map and write it as the dataset's mask
    (no review; see :class:`MaskReview` for that)."""
    proposals = {}
    for _, row in dataset.manifest.iterrows():
        image = dataset.image(row)
        box, points = heatmap_prompt(daam(dataset.record(row), row["word"]), image.shape, tau)
        mask = segmenter(image, box, points, np.ones(len(points), int))
        save_png(np.uint8(mask) * 255, dataset.directory / row["mask"])
        proposals[row["name"]] = mask
    return proposals
