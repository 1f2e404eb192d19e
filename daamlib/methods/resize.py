"""Spatial resizing of maps whose last two dimensions are (height, width)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

UpsampleMode = Literal["bilinear", "bicubic"]
UPSAMPLE_MODES = ("bilinear", "bicubic")


def check_upsample_mode(mode: str) -> None:
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode {mode!r} is not supported; use one of {UPSAMPLE_MODES}")


def resize(maps: torch.Tensor, size: tuple[int, int], mode: UpsampleMode = "bilinear") -> torch.Tensor:
    """Resize ``maps`` [..., h, w] to [..., *size] (a no-op when already that size)."""
    check_upsample_mode(mode)
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    leading = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])  # [1, channels, h, w]
    if not flat.is_floating_point():
        flat = flat.float()
    resized = F.interpolate(flat, size=tuple(size), mode=mode, align_corners=False)
    return resized.reshape(*leading, *size)


def unflatten_positions(maps: torch.Tensor, resolution: tuple[int, int]) -> torch.Tensor:
    """[..., h*w, channels] -> [..., channels, h, w]."""
    height, width = resolution
    moved = maps.movedim(-1, -2)  # [..., channels, h*w]
    return moved.reshape(*moved.shape[:-1], height, width)
