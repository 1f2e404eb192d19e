"""Every method scored on *rendered* toy scenes with exact labels (beside the generated-image protocol).

The scenes are real images to the model: :func:`daamlib.attribute_image` noises each to the chosen
timesteps and denoises once under a trace, with the thesis prompt of its main class. The maps of the
class word are scored as in :mod:`daamlab.experiments.evaluation` (IoU(τ) per image, max mIoU over τ
per class, "All" = mean of the classes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

import daamlib
from daamlib.methods import HeatmapMethod
from daamlib.metrics import iou_curve, thresholds
from daamlib.modules import denoiser
from daamlib.record import Record, load_record
from daamlab.experiments.evaluation import Curves
from daamlab.toyworld import labels as L
from daamlab.toyworld.captions import THESIS_TEMPLATE
from daamlab.toyworld.dataset import HELD_OUT_FIRST_SEED, SceneSet, render_scene_set


def default_image_size(pipe) -> int:
    """The side in pixels a pipeline generates by default: the denoiser's latent ``sample_size`` (a UNet's, or a
    DiT's such as PixArt's and SD3's; Flux's pipeline keeps it as ``default_sample_size``) times the VAE factor."""
    latent = getattr(denoiser(pipe).config, "sample_size", None) or getattr(pipe, "default_sample_size", None)
    if isinstance(latent, (tuple, list)) and len(set(latent)) == 1:
        latent = latent[0]
    if not isinstance(latent, int):
        raise ValueError(f"{type(pipe).__name__} names no square default size (its denoiser's sample_size is {latent!r}); "
                         "pass size= in pixels, a multiple of the VAE factor")
    return latent * pipe.vae_scale_factor


def render_scenes(pipe, num_scenes: int, first_seed: int = HELD_OUT_FIRST_SEED, progress: bool = True,
                  size: int | None = None) -> SceneSet:
    """``num_scenes`` held-out scenes (seeds never used in training), ``size`` pixels a side (default: the
    pipeline's image size, :func:`default_image_size`)."""
    size = default_image_size(pipe) if size is None else size
    return render_scene_set(num_scenes, size, first_seed=first_seed, progress=progress)


def scene_class(scenes: SceneSet, index: int) -> str:
    return L.MAIN_CLASSES[int(scenes.classes[index])]


def attribute_scenes(pipe, scenes: SceneSet, timesteps: Sequence[int], template: str = THESIS_TEMPLATE,
                     out: str | Path | None = None, progress: bool = True, **trace_fields) -> list[Record]:
    """One record per scene for ``template`` with its main class, its noise seeded by the scene's seed.
    With ``out``, the scenes (``scenes.npz``) and records (``records/<index>.safetensors``) are saved there."""
    records = []
    for index in tqdm(range(len(scenes)), desc="attribute scenes", disable=not progress):
        prompt = template.format(object=scene_class(scenes, index))
        records += daamlib.attribute_image(pipe, scenes.images[index], prompt, timesteps=list(timesteps),
                                           seed=int(scenes.seeds[index]), **trace_fields)
    if out is not None:
        save_attributions(out, scenes, records)
    return records


def save_attributions(out: str | Path, scenes: SceneSet, records: Sequence[Record]) -> None:
    out = Path(out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    scenes.save(out / "scenes.npz")
    for index, record in enumerate(records):
        record.save(out / "records" / f"{index:04d}")


def load_attributions(out: str | Path) -> tuple[SceneSet, list[Record]]:
    out = Path(out)
    scenes = SceneSet.load(out / "scenes.npz")
    return scenes, [load_record(out / "records" / f"{index:04d}.safetensors") for index in range(len(scenes))]


def scene_mask(scenes: SceneSet, index: int) -> np.ndarray:
    """The exact mask [S, S] of the scene's main class (Cityscapes conventions of the renderer)."""
    return scenes.labels[index] == L.IDS[scene_class(scenes, index)]


def rendered_curves(scenes: SceneSet, records: Sequence[Record], method: HeatmapMethod,
                    taus: np.ndarray | None = None) -> Curves:
    """IoU(τ) per scene of the class word's map (``CLASS_WORD``: "light" for traffic light), by class."""
    taus = thresholds() if taus is None else taus
    iou: dict[str, list] = {name: [] for name in L.MAIN_CLASSES}
    seeds: dict[str, list[int]] = {name: [] for name in L.MAIN_CLASSES}
    for index, record in enumerate(records):
        name = scene_class(scenes, index)
        heatmap = method.attribute(record, L.CLASS_WORD[name]).heatmap
        iou[name].append(iou_curve(heatmap, scene_mask(scenes, index), taus))
        seeds[name].append(int(scenes.seeds[index]))
    return Curves({name: np.stack(v) for name, v in iou.items() if v}, {name: s for name, s in seeds.items() if s})


def rendered_table(scenes: SceneSet, records: Sequence[Record], methods: Mapping[str, HeatmapMethod]) -> dict[str, Curves]:
    """Curves of every method, by its name."""
    return {name: rendered_curves(scenes, records, method) for name, method in methods.items()}
