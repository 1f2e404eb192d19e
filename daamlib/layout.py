"""Tensor layouts shared by capture and methods: attention heads split off the channels, flattened
positions back to a grid, and spatial resizing of maps whose last two dimensions are (height, width)."""

from __future__ import annotations

import numbers
from typing import Literal

import torch
import torch.nn.functional as F

UpsampleMode = Literal["bilinear", "bicubic"]
UPSAMPLE_MODES = ("bilinear", "bicubic")
NATIVE = "native"  # the methods' choice of no resizing: maps at the attention's own grid


def check_upsample_mode(mode: str) -> None:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode {mode!r} is not supported; use one of {UPSAMPLE_MODES}")


def resize(maps: torch.Tensor, size: tuple[int, int], mode: UpsampleMode = "bilinear") -> torch.Tensor:
    """Resize ``maps`` [..., h, w] to [..., *size] (a no-op when already that size).

    Integer and boolean maps are resized as float32; ``size`` is (height, width), positive ints."""
    check_upsample_mode(mode)
    size = _check_size(size)
    if not isinstance(maps, torch.Tensor):
        raise TypeError(f"resize takes a torch.Tensor [..., h, w]; got {type(maps).__name__} (use torch.as_tensor)")
    if maps.ndim < 2 or maps.shape[-2] == 0 or maps.shape[-1] == 0:
        raise ValueError(f"resize needs maps [..., h, w] with h, w > 0; got shape {list(maps.shape)}")
    if tuple(maps.shape[-2:]) == size:
        return maps
    leading = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])  # [1, channels, h, w]
    if not flat.is_floating_point():
        flat = flat.float()
    resized = F.interpolate(flat, size=size, mode=mode, align_corners=False)
    return resized.reshape(*leading, *size)


def _check_size(size) -> tuple[int, int]:
    try:
        values = tuple(size)
    except TypeError:
        raise TypeError(f"size is (height, width); got {size!r}") from None
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in values):
        raise ValueError(f"size is (height, width) with two positive ints; got {size!r}")
    return int(values[0]), int(values[1])


def unflatten_positions(maps: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """[..., h*w, channels] -> [..., channels, h, w]."""
    height, width = resolution
    if maps.ndim < 2 or maps.shape[-2] != height * width:
        raise ValueError(f"maps [..., positions, channels] of shape {list(maps.shape)} do not hold {height}x{width} positions; "
                         "the record's layer resolution and its maps disagree (a corrupt or hand-built record?)")
    moved = maps.movedim(-1, -2)  # [..., channels, h*w]
    return moved.reshape(*moved.shape[:-1], height, width)


def split_heads(projected: torch.Tensor, heads: int) -> torch.Tensor:
    """[batch, positions, heads*head_dim] -> [batch, heads, positions, head_dim]."""
    batch, positions, inner = projected.shape
    return projected.view(batch, positions, heads, inner // heads).transpose(1, 2)
