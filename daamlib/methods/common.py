"""Shared helpers for the methods: argument checks, layer and step selection, layer-wise aggregation.

Every check runs once per call and raises with what was wrong and what to do instead."""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

from ..record import LayerMeta, Record
from ..layout import resize, unflatten_positions


def check_record(record: Record, function: str = "this method") -> None:
    """Raise a TypeError unless ``record`` is one :class:`Record` (a common slip: the list ``tr.records``)."""
    if isinstance(record, Record):
        return
    hint = " pass one of its records, e.g. records[0]" if isinstance(record, (list, tuple)) else ""
    raise TypeError(
        f"{function} takes a daamlib Record (from daamlib.generate or trace(...).records); "
        f"got {type(record).__name__}.{hint}"
    )


def chosen_layers(record: Record, layers: Sequence[str] | None, available: Iterable[str]) -> list[LayerMeta]:
    """Cross-attention layers of ``record`` restricted to ``layers`` and to those with data (never empty)."""
    available = set(available)
    cross = [layer for layer in record.cross_layers if layer.name in available]
    if layers is None:
        if not cross:
            raise KeyError("the record holds no cross-attention maps of the kind this method needs")
        return cross
    wanted = _name_list(layers)
    names = {layer.name for layer in cross}
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise KeyError(f"layers {unknown} are not in this record; recorded: {sorted(names)}")
    return [layer for layer in cross if layer.name in set(wanted)]


def _name_list(layers) -> list[str]:
    if isinstance(layers, str):
        raise TypeError(f"layers is a list of layer names; got the string {layers!r} (wrap it: layers=[{layers!r}])")
    try:
        wanted = list(layers)
    except TypeError:
        raise TypeError(f"layers is a list of layer names or None; got {type(layers).__name__}") from None
    if not wanted:
        raise ValueError("layers=[] selects no layer; pass None for every recorded layer, or some layer names")
    bad = [name for name in wanted if not isinstance(name, str)]
    if bad:
        raise TypeError(f"layer names are strings such as 'up_blocks.1.attentions.0.transformer_blocks.0.attn2'; got {bad}")
    return wanted


def sum_upsampled(
    per_layer: dict[str, torch.Tensor], layers: list[LayerMeta], latent_size: tuple[int, int], upsample: str
) -> torch.Tensor:
    """sum_l up(maps_l): maps_l is [hw_l, k] at the layer's resolution; returns [k, H, W]."""
    if not layers:
        raise ValueError("no layer to aggregate; choose at least one recorded layer")
    total = None
    for layer in layers:
        maps = unflatten_positions(per_layer[layer.name], layer.resolution)  # [k, h_l, w_l]
        up = resize(maps, latent_size, upsample)
        total = up if total is None else total + up
    return total


def select_steps(record: Record, steps: Sequence[int] | None) -> list[int]:
    """Step indices 0..T-1 to aggregate (all when None); empty, repeated or out-of-range selections raise."""
    if steps is None:
        return list(range(record.num_steps))
    if isinstance(steps, (str, bytes)) or isinstance(steps, numbers.Number):
        raise TypeError(f"steps is a list of step indices or None; got {steps!r} (wrap one step: steps=[{steps!r}])")
    try:
        chosen = list(steps)
    except TypeError:
        raise TypeError(f"steps is a list of step indices or None; got {type(steps).__name__}") from None
    if not chosen:
        raise ValueError("steps=[] selects no step (the heatmap would be all zeros); pass None for every step")
    bad_type = [s for s in chosen if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
    if bad_type:
        raise TypeError(f"steps are integer indices 0..{record.num_steps - 1}; got {bad_type}")
    chosen = [int(s) for s in chosen]
    bad = [s for s in chosen if not 0 <= s < record.num_steps]
    if bad:
        raise IndexError(f"steps {bad} are outside the record's {record.num_steps} steps (0..{record.num_steps - 1})")
    repeated = sorted({s for s in chosen if chosen.count(s) > 1})
    if repeated:
        raise ValueError(f"steps {repeated} are repeated; each step is counted once, so list it once")
    return chosen


def token_count(record: Record) -> int | None:
    """How many text tokens (keys) the record's maps have, or None when it cannot tell."""
    if record.meta.token_ids is not None:
        return len(record.meta.token_ids)
    if record.text_embeddings is not None:
        return record.text_embeddings.shape[0]
    for maps in (record.daam, record.daam_heads, record.daam_steps):
        for tensor in maps.values():
            return tensor.shape[-1]
    return None


def check_token_index(record: Record, index, what: str = "token index") -> int:
    """A token position as a non-negative int below the record's token count (negative counts from the end)."""
    if isinstance(index, bool) or not isinstance(index, numbers.Integral):
        raise TypeError(f"a {what} is an int; got {index!r} ({type(index).__name__})")
    index = int(index)
    size = token_count(record)
    if size is None:
        return index
    if not -size <= index < size:
        raise IndexError(f"{what} {index} is outside the {size} tokens (0..{size - 1})")
    return index % size


def word_indices(record: Record, word: str | int, occurrence: int = 0) -> list[int]:
    """Token positions of a word of the generating prompt, or a single validated token index."""
    if isinstance(occurrence, bool) or not isinstance(occurrence, numbers.Integral):
        raise TypeError(f"occurrence is an int (0 = the first time the word appears); got {occurrence!r}")
    if occurrence < 0:
        raise ValueError(f"occurrence={occurrence} is negative; use 0 for the first time the word appears, 1 for the second, ...")
    if isinstance(word, numbers.Integral) and not isinstance(word, bool):
        if occurrence != 0:
            raise ValueError(f"occurrence={occurrence} applies to words; a token index ({word}) is one position already")
        return [check_token_index(record, word)]
    if not isinstance(word, str):
        raise TypeError(
            f"word is a word of the prompt (str, e.g. 'car' or '<eot>') or a token index (int); "
            f"got {word!r} ({type(word).__name__})"
        )
    return list(record.tokens.token_indices(word, occurrence))
