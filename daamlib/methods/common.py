"""Shared helpers for the methods: argument checks, layer and step selection, layer-wise aggregation.

Every check runs once per call and raises with what was wrong and what to do instead."""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

from ..record import LayerMeta, Record
from ..layout import NATIVE, UPSAMPLE_MODES, resize, unflatten_positions
from ..selection import layer_names, step_indices


def check_record(record: Record, function: str = "this method") -> None:
    """Raise a TypeError unless ``record`` is one :class:`Record` (a common slip: the list ``tr.records``)."""
    if isinstance(record, Record):
        return
    hint = " pass one of its records, e.g. records[0]" if isinstance(record, (list, tuple)) else ""
    raise TypeError(f"{function} takes a daamlib Record (from daamlib.generate or trace(...).records); "
                    f"got {type(record).__name__}.{hint}")


def chosen_layers(record: Record, layers: Sequence[str] | None, available: Iterable[str]) -> list[LayerMeta]:
    """Cross-attention layers of ``record`` restricted to ``layers`` and to those with data (never empty)."""
    available = set(available)
    cross = [layer for layer in record.cross_layers if layer.name in available]
    if layers is None:
        if not cross:
            raise KeyError("the record holds no cross-attention maps of the kind this method needs")
        return cross
    wanted = layer_names(layers)
    names = {layer.name for layer in cross}
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise KeyError(f"layers {unknown} are not in this record; recorded: {sorted(names)}")
    return [layer for layer in cross if layer.name in set(wanted)]


def sum_upsampled(
    per_layer: dict[str, torch.Tensor], layers: list[LayerMeta], latent_size: tuple[int, int], upsample: str
) -> torch.Tensor:
    """sum_l up(maps_l): maps_l is [hw_l, k] at the layer's resolution; returns [k, H, W] at ``latent_size``.

    ``upsample="native"`` sums the maps where the attention computed them, with no interpolation: [k, h, w] at the
    one grid every selected layer shares (a DiT's patch grid, or one UNet resolution chosen with ``layers=``)."""
    if not layers:
        raise ValueError("no layer to aggregate; choose at least one recorded layer")
    if upsample == NATIVE:  # no interpolation: the one grid all selected layers share
        grids = sorted({tuple(layer.resolution) for layer in layers})
        if len(grids) > 1:
            raise ValueError(f"upsample='native' needs layers of one grid; the selected ones have {grids}: choose them "
                             f"with layers=[...], or resize to the latent with upsample in {UPSAMPLE_MODES}")
        return sum(unflatten_positions(per_layer[layer.name], layer.resolution) for layer in layers)  # [k, h, w]
    return sum(resize(unflatten_positions(per_layer[layer.name], layer.resolution), latent_size, upsample)  # [k, h_l, w_l]
               for layer in layers)


def select_steps(record: Record, steps: Sequence[int] | None) -> list[int]:
    """Step indices 0..T-1 to aggregate (all when None); empty, repeated or out-of-range selections raise."""
    chosen = step_indices(steps, "steps", record.num_steps)
    return list(range(record.num_steps)) if chosen is None else list(chosen)


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


def word_indices(record: Record, word: str | int, occurrence: int = 0, stream: str | None = None) -> list[int]:
    """Token positions of a word of the generating prompt (in ``stream``, see ``PromptTokens.token_indices``),
    or a single validated token index."""
    if isinstance(occurrence, bool) or not isinstance(occurrence, numbers.Integral):
        raise TypeError(f"occurrence is an int (0 = the first time the word appears); got {occurrence!r}")
    if occurrence < 0:
        raise ValueError(f"occurrence={occurrence} is negative; use 0 for the first time the word appears, 1 for the second, ...")
    if isinstance(word, numbers.Integral) and not isinstance(word, bool):
        if occurrence != 0 or stream is not None:
            what = f"occurrence={occurrence}" if occurrence != 0 else f"stream={stream!r}"
            raise ValueError(f"{what} applies to words; a token index ({word}) is one position already")
        return [check_token_index(record, word)]
    if not isinstance(word, str):
        raise TypeError(f"word is a word of the prompt (str, e.g. 'car' or '<eot>') or a token index (int); "
                        f"got {word!r} ({type(word).__name__})")
    return list(record.tokens.token_indices(word, occurrence, stream))
