"""DAAM heatmaps (thesis eq. 3.1-3.4) and the aggregation of the original ``daam`` 0.2.0 package."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from ..record import Record
from .common import chosen_layers, select_steps, sum_upsampled, word_indices
from .resize import resize, unflatten_positions

Mode = Literal["thesis", "daam-0.2"]
_DAAM_02_SKIPPED_FACTOR = 8  # daam 0.2.0 drops the layers 8x smaller than the latent


def daam(
    record: Record,
    word: str | int,
    *,
    occurrence: int = 0,
    mode: Mode = "thesis",
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """The DAAM heatmap of a word (or token index) of the generating prompt.  [H, W] (latent size)

    ``mode="thesis"``: D_k = sum over steps, layers, heads of up(A[:, k]); ``upsample`` is
    "bilinear" or "bicubic". ``mode="daam-0.2"`` reproduces the ``daam`` 0.2.0 package: per
    (layer, head) time-summed maps, bicubic upsampling, clamp >= 0, mean over (layer, head),
    layers at 1/8 of the latent skipped (needs ``trace(per_head=True)``). A multi-token word
    averages its tokens' maps.
    """
    indices = word_indices(record, word, occurrence)
    maps = token_maps(record, indices, mode=mode, layers=layers, steps=steps, upsample=upsample)
    return maps.mean(dim=0)


def token_maps(
    record: Record,
    token_indices: Sequence[int],
    *,
    mode: Mode = "thesis",
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """DAAM maps of several token positions.  [k, H, W]"""
    indices = list(token_indices)
    if mode == "thesis":
        return _thesis_maps(record, indices, layers, steps, upsample)
    if mode == "daam-0.2":
        if steps is not None:
            raise ValueError("mode='daam-0.2' aggregates every step, as the original package did; drop steps=")
        return _daam_02_maps(record, indices, layers)
    raise ValueError(f"mode {mode!r} is not supported; use 'thesis' or 'daam-0.2'")


def _thesis_maps(record, indices, layers, steps, upsample) -> torch.Tensor:
    if steps is None:
        chosen = chosen_layers(record, layers, record.daam)
        per_layer = {layer.name: record.daam[layer.name][:, indices] for layer in chosen}  # [hw, k]
    else:
        if not record.daam_steps:
            raise KeyError("per-step maps were not recorded; trace with per_step=True to select steps")
        step_list = select_steps(record, steps)
        chosen = chosen_layers(record, layers, record.daam_steps)
        per_layer = {
            layer.name: record.daam_steps[layer.name][step_list][:, :, indices].sum(dim=0) for layer in chosen
        }  # [hw, k]
    return sum_upsampled(per_layer, chosen, record.latent_size, upsample)


def _daam_02_maps(record, indices, layers) -> torch.Tensor:
    if not record.daam_heads:
        raise KeyError("mode='daam-0.2' needs per-head maps; trace with per_head=True")
    height, width = record.latent_size
    chosen = [
        layer
        for layer in chosen_layers(record, layers, record.daam_heads)
        if height // layer.resolution[0] != _DAAM_02_SKIPPED_FACTOR
    ]
    if not chosen:
        raise ValueError("every chosen layer is at 1/8 of the latent, which daam 0.2.0 skips")
    maps = []
    for layer in chosen:
        per_head = unflatten_positions(record.daam_heads[layer.name][:, :, indices], layer.resolution)  # [heads, k, h, w]
        maps.append(resize(per_head, record.latent_size, "bicubic").clamp(min=0))
    return torch.cat(maps, dim=0).mean(dim=0)  # mean over every (layer, head): [k, H, W]
