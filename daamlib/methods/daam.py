"""DAAM heatmaps (thesis eq. 3.1-3.4) and the aggregation of the original ``daam`` 0.2.0 package."""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from ..record import LayerMeta, Record
from .common import check_record, check_token_index, chosen_layers, select_steps, sum_upsampled, word_indices
from ..layout import resize, unflatten_positions

Mode = Literal["thesis", "daam-0.2"]
MODES = ("thesis", "daam-0.2")
_DAAM_02_SKIPPED_FACTOR = 8  # daam 0.2.0 drops the layers 8x smaller than the latent
_DAAM_02_BLOCKS = ("down_blocks.", "up_blocks.")  # its locator walks these; it never hooks the mid block


def daam(record: Record, word: str | int, *, occurrence: int = 0, stream: str | None = None, mode: Mode = "thesis",
         layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, upsample: str | None = None) -> torch.Tensor:
    """The DAAM heatmap of a word (or token index) of the generating prompt.  [H, W] (latent size)

    ``word`` is a word or words of the prompt ("car", "urban environment", "<sot>", "<eot>") or an
    int token position; ``occurrence`` (>= 0) picks among repeats of a word; ``stream`` ("clip", "t5") the text
    encoder whose tokens are read on SD3 (None: CLIP, or T5 where CLIP lacks the word). A multi-token word
    averages its tokens' maps. ``layers`` / ``steps`` restrict the sum (None = all; an empty list
    is an error, not a zero map).

    ``mode="thesis"``: D_k = sum over steps, layers, heads of up(A[:, k]); ``upsample`` is "bilinear" (default)
    or "bicubic" to the latent size, or "native": the sum at the grid the layers share, uninterpolated [h, w].

    ``mode="daam-0.2"`` reproduces the ``daam`` 0.2.0 package: per (layer, head) time-summed maps,
    bicubic upsampling, clamp >= 0, mean over (layer, head); needs ``trace(per_head=True)``. It
    uses exactly the cross-attention layers of the **down and up blocks** (``down_blocks.*`` and
    ``up_blocks.*``) whose maps are not at 1/8 of the latent (latent height // layer height == 8:
    the 8x8 layers of a 64x64 latent are skipped). The **mid block is never used**, whatever its
    resolution: the package's locator never hooked it. ``steps`` are not allowed (it summed every
    step), ``upsample`` may only be "bicubic", and ``layers`` may only name layers the mode uses.
    """
    check_record(record, "daam")
    indices = word_indices(record, word, occurrence, stream)
    maps = token_maps(record, indices, mode=mode, layers=layers, steps=steps, upsample=upsample)
    return maps.mean(dim=0)


def token_maps(record: Record, token_indices: Sequence[int], *, mode: Mode = "thesis", layers: Sequence[str] | None = None,
               steps: Sequence[int] | None = None, upsample: str | None = None) -> torch.Tensor:
    """DAAM maps of several token positions (ints, at least one).  [k, H, W]; see :func:`daam`."""
    check_record(record, "token_maps")
    _check_mode(mode)
    indices = _index_list(record, token_indices)
    if mode == "thesis":
        maps = _thesis_maps(record, indices, layers, steps, "bilinear" if upsample is None else upsample)  # resize checks it
    else:
        if steps is not None:
            raise ValueError("mode='daam-0.2' aggregates every step, as the original package did; drop steps=")
        if upsample not in (None, "bicubic"):
            raise ValueError(f"mode='daam-0.2' upsamples bicubically, as the original package did; drop upsample={upsample!r}")
        maps = _daam_02_maps(record, indices, layers)
    _check_finite(maps)
    return maps


def daam_02_layers(record: Record, layers: Sequence[str] | None = None) -> list[LayerMeta]:
    """The layers ``mode="daam-0.2"`` aggregates: down/up-block cross-attention not at 1/8 of the latent."""
    if not record.daam_heads:
        raise KeyError("mode='daam-0.2' needs per-head maps; trace with per_head=True")
    candidates = chosen_layers(record, layers, record.daam_heads)
    used = [layer for layer in candidates if layer.name.startswith(_DAAM_02_BLOCKS)
            and record.latent_size[0] // layer.resolution[0] != _DAAM_02_SKIPPED_FACTOR]
    if layers is not None and len(used) < len(candidates):
        dropped = [layer.name for layer in candidates if layer not in used]
        raise ValueError(f"mode='daam-0.2' never uses layers {dropped} (mid block, or maps at 1/8 of the latent, as the "
                         "original package); drop them from layers=, or use mode='thesis'")
    if not used:
        raise ValueError("no recorded layer is one daam 0.2.0 used (it skips the mid block and layers at 1/8 of the latent); "
                         "use mode='thesis'")
    return used


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not supported; use one of {MODES}")


def _index_list(record: Record, token_indices) -> list[int]:
    if isinstance(token_indices, (str, bytes)) or not hasattr(token_indices, "__iter__"):
        raise TypeError(f"token_maps takes a list of token positions; got {token_indices!r}. "
                        "For a word use daamlib.daam(record, word)")
    indices = [check_token_index(record, index) for index in token_indices]
    if not indices:
        raise ValueError("token_indices is empty; pass at least one token position (e.g. record.tokens.token_indices('car'))")
    return indices


def _check_finite(maps: torch.Tensor) -> None:
    finite = torch.isfinite(maps)
    if not finite.all():
        raise ValueError(f"the DAAM maps have {int((~finite).sum())} NaN or inf values: the record's attention sums are not "
                         "finite (e.g. a record saved with dtype=torch.float16 that overflowed); trace again in float32")


def _thesis_maps(record, indices, layers, steps, upsample) -> torch.Tensor:
    if steps is None:
        chosen = chosen_layers(record, layers, record.daam)
        per_layer = {layer.name: record.daam[layer.name][:, indices] for layer in chosen}  # [hw, k]
    else:
        step_list = select_steps(record, steps)
        if not record.daam_steps:
            raise KeyError("per-step maps were not recorded; trace with per_step=True to select steps")
        chosen = chosen_layers(record, layers, record.daam_steps)
        per_layer = {
            layer.name: record.daam_steps[layer.name][step_list][:, :, indices].sum(dim=0) for layer in chosen
        }  # [hw, k]
    return sum_upsampled(per_layer, chosen, record.latent_size, upsample)


def _daam_02_maps(record, indices, layers) -> torch.Tensor:
    maps = [resize(unflatten_positions(record.daam_heads[layer.name][:, :, indices], layer.resolution),  # [heads, k, h, w]
                   record.latent_size, "bicubic").clamp(min=0) for layer in daam_02_layers(record, layers)]
    return torch.cat(maps, dim=0).mean(dim=0)  # mean over every (layer, head): [k, H, W]
