"""The one rule for choosing layers and steps, shared by ``trace`` (what to record) and the methods
(what to aggregate): lists of layer names and of step indices, checked with errors that say what to pass."""

from __future__ import annotations

import numbers


def layer_names(layers, name: str = "layers") -> tuple[str, ...] | None:
    """``layers`` as a tuple of module paths (``None`` stays ``None``: every layer)."""
    if layers is None:
        return None
    chosen = _listed(layers, name, "layer names", "layer", singles=(str,))
    bad = [layer for layer in chosen if not isinstance(layer, str)]
    if bad:
        raise TypeError(f"layer names are strings such as 'up_blocks.1.attentions.0.transformer_blocks.0.attn2'; got {bad}")
    return chosen


def step_indices(steps, name: str = "steps", num_steps: int | None = None) -> tuple[int, ...] | None:
    """``steps`` as a tuple of distinct step indices 0..num_steps-1 (``None`` stays ``None``: every step)."""
    if steps is None:
        return None
    chosen = list(_listed(steps, name, "step indices", "step", singles=(str, bytes, numbers.Number)))
    bad_type = [step for step in chosen if isinstance(step, bool) or not isinstance(step, numbers.Integral)]
    if bad_type:
        raise TypeError(f"{name} are integer step indices (0 = the first step); got {bad_type}")
    chosen = [int(step) for step in chosen]
    negative = [step for step in chosen if step < 0]
    if negative:
        raise IndexError(f"{name} {negative} are negative; steps count from 0 (the first step)")
    if num_steps is not None:
        outside = [step for step in chosen if step >= num_steps]
        if outside:
            raise IndexError(f"{name} {outside} are outside the record's {num_steps} steps (0..{num_steps - 1})")
    repeated = sorted({step for step in chosen if chosen.count(step) > 1})
    if repeated:
        raise ValueError(f"{name} {repeated} are repeated; each step is counted once, so list it once")
    return tuple(chosen)


def _listed(values, name: str, items: str, item: str, singles: tuple[type, ...]) -> tuple:
    """``values`` as a non-empty tuple; a single value (one of ``singles``) or a non-iterable says how to wrap it."""
    if isinstance(values, singles):
        raise TypeError(f"{name} is a list of {items} or None; got {values!r} (wrap one {item}: {name}=[{values!r}])")
    try:
        chosen = tuple(values)
    except TypeError:
        raise TypeError(f"{name} is a list of {items} or None; got {type(values).__name__}") from None
    if not chosen:
        raise ValueError(f"{name}=[] selects no {item}; pass None for every {item}, or some {items}")
    return chosen
