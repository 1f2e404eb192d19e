"""Shared helpers for the methods: layer selection and layer-wise aggregation."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from ..record import LayerMeta, Record
from .resize import resize, unflatten_positions


def chosen_layers(record: Record, layers: Sequence[str] | None, available: Iterable[str]) -> list[LayerMeta]:
    """Cross-attention layers of ``record`` restricted to ``layers`` and to those with data."""
    available = set(available)
    cross = [layer for layer in record.cross_layers if layer.name in available]
    if layers is None:
        if not cross:
            raise KeyError("the record holds no cross-attention maps of the kind this method needs")
        return cross
    names = {layer.name for layer in cross}
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise KeyError(f"layers {unknown} are not in this record; recorded: {sorted(names)}")
    return [layer for layer in cross if layer.name in set(layers)]


def sum_upsampled(
    per_layer: dict[str, torch.Tensor], layers: list[LayerMeta], latent_size: tuple[int, int], upsample: str
) -> torch.Tensor:
    """sum_l up(maps_l): maps_l is [hw_l, k] at the layer's resolution; returns [k, H, W]."""
    total = None
    for layer in layers:
        maps = unflatten_positions(per_layer[layer.name], layer.resolution)  # [k, h_l, w_l]
        up = resize(maps, latent_size, upsample)
        total = up if total is None else total + up
    return total


def select_steps(record: Record, steps: Sequence[int] | None) -> list[int]:
    if steps is None:
        return list(range(record.num_steps))
    bad = [s for s in steps if not 0 <= s < record.num_steps]
    if bad:
        raise IndexError(f"steps {bad} are outside the record's {record.num_steps} steps (0..{record.num_steps - 1})")
    return list(steps)


def word_indices(record: Record, word: str | int, occurrence: int = 0) -> list[int]:
    """Token positions of a word of the generating prompt, or a single validated token index."""
    if isinstance(word, int) and record.meta.token_ids is None:
        size = record.text_embeddings.shape[0] if record.text_embeddings is not None else None
        if size is not None and not -size <= word < size:
            raise IndexError(f"token index {word} is outside the {size} tokens")
        return [word % size if size else word]
    return list(record.tokens.token_indices(word, occurrence))
