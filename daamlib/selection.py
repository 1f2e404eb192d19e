"""The one rule for choosing layers and steps, shared by ``trace`` (what to record) and the methods
(what to aggregate): lists of layer names and of step indices, checked with errors that say what to pass."""

from __future__ import annotations

import numbers


def layer_names(layers, name: str = "layers") -> tuple[str, ...] | None:
    """``layers`` as a tuple of module paths (``None`` stays ``None``: every layer)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        raise TypeError(f"{name} is a list of layer names; got the string {layers!r} (wrap one layer: {name}=[{layers!r}])")
    try:
        chosen = tuple(layers)
    except TypeError:
        raise TypeError(f"{name} is a list of layer names or None; got {type(layers).__name__}") from None
    if not chosen:
        raise ValueError(f"{name}=[] selects no layer; pass None for every layer, or some layer names")
    bad = [layer for layer in chosen if not isinstance(layer, str)]
    if bad:
        raise TypeError(f"layer names are strings such as 'up_blocks.1.attentions.0.transformer_blocks.0.attn2'; got {bad}")
    return chosen


def step_indices(steps, name: str = "steps", num_steps: int | None = None) -> tuple[int, ...] | None:
    """``steps`` as a tuple of distinct step indices 0..num_steps-1 (``None`` stays ``None``: every step)."""
    if steps is None:
        return None
    if isinstance(steps, (str, bytes, numbers.Number)):
        raise TypeError(f"{name} is a list of step indices or None; got {steps!r} (wrap one step: {name}=[{steps!r}])")
    try:
        chosen = list(steps)
    except TypeError:
        raise TypeError(f"{name} is a list of step indices or None; got {type(steps).__name__}") from None
    if not chosen:
        raise ValueError(f"{name}=[] selects no step (the heatmap would be all zeros); pass None for every step")
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
