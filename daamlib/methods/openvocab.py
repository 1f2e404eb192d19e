"""Open-vocabulary DAAM (thesis eq. 3.5-3.6): softmax maps for any context phrase X'.

The phrase's keys are SOT, its words and EOT (``include_padding=True`` adds the padding
tokens, which reproduces DAAM exactly when X' is the generating prompt). Two sources:
  * a query cache recorded with ``trace(queries=True)`` (needs ``pipe`` for W_k and the text
    encoder), or
  * maps recorded by re-running the seeded generation with ``trace(contexts=[phrase])``.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..capture.processor import split_heads
from ..record import Record
from ..text import TextEncoder
from ..tokens import PromptTokens
from .common import chosen_layers, select_steps, sum_upsampled


def openvocab(
    record: Record,
    context: str,
    word: str | None = None,
    *,
    pipe=None,
    occurrence: int = 0,
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    include_padding: bool = False,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """Heatmap of ``word`` inside ``context`` ([H, W]), or of every key token of ``context`` ([m, H, W])."""
    if not isinstance(context, str) or not context.strip():
        raise ValueError("the context phrase is empty; pass a phrase such as 'a car and a tree in a street'")
    if context in record.contexts and steps is None:
        tokens = _stored_context_tokens(record, context)
        chosen = chosen_layers(record, layers, record.contexts[context])
        maps = sum_upsampled(record.contexts[context], chosen, record.latent_size, upsample)
    elif record.queries:
        if pipe is None:
            raise ValueError("open-vocabulary maps from the query cache need pipe= (text encoder and W_k)")
        encoded = TextEncoder(pipe).encode(context)
        positions = encoded.key_positions(include_padding)
        tokens = encoded.tokens
        maps = openvocab_maps(record, encoded.embeddings[positions], pipe, layers=layers, steps=steps, upsample=upsample)
    else:
        raise KeyError(
            f"the record has no query cache and no re-run maps for {context!r}: trace with queries=True, "
            f"or re-run the seeded generation inside trace(contexts=[{context!r}])"
        )
    if word is None:
        return maps
    indices = list(tokens.token_indices(word, occurrence))  # words lie between SOT and EOT: always keys
    return maps[indices].mean(dim=0)


def openvocab_maps(
    record: Record,
    key_embeddings: torch.Tensor,
    pipe,
    *,
    layers: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    upsample: str = "bilinear",
) -> torch.Tensor:
    """Softmax maps over the keys made from ``key_embeddings`` [m, d_text] -> [m, H, W].

    Uses every cached (layer, step) query; differentiable in ``key_embeddings`` when they require
    grad (the model's own weights never get gradients here).
    """
    with torch.set_grad_enabled(key_embeddings.requires_grad):
        return _openvocab_maps(record, key_embeddings, pipe, layers, steps, upsample)


def _openvocab_maps(record, key_embeddings, pipe, layers, steps, upsample) -> torch.Tensor:
    layer_names = {layer for layer, _ in record.queries}
    chosen = chosen_layers(record, layers, layer_names)
    chosen_names = {layer.name for layer in chosen}
    step_filter = set(select_steps(record, steps))
    unet = pipe.unet
    per_layer: dict[str, torch.Tensor] = {}
    keys_per_layer: dict[str, torch.Tensor] = {}  # W_k X' depends on the layer only, not the step
    for (name, step), queries in record.queries.items():
        if step not in step_filter or name not in chosen_names:
            continue
        meta = record.layer(name)
        if name not in keys_per_layer:
            to_k = unet.get_submodule(name).to_k
            keys = to_k(key_embeddings.to(to_k.weight.device, to_k.weight.dtype)).float().cpu()  # [m, inner]
            keys_per_layer[name] = split_heads(keys[None], meta.heads)[0]  # [heads, m, d]
        q = split_heads(queries.float()[None], meta.heads)[0]  # [heads, hw, d]
        probs = torch.softmax(q @ keys_per_layer[name].transpose(-1, -2) * meta.scale, dim=-1).sum(dim=0)  # [hw, m]
        per_layer[name] = per_layer[name] + probs if name in per_layer else probs
    if not per_layer:
        raise KeyError("no cached queries match the chosen layers and steps")
    present = [layer for layer in chosen if layer.name in per_layer]
    return sum_upsampled(per_layer, present, record.latent_size, upsample)


def _stored_context_tokens(record: Record, context: str) -> PromptTokens:
    strings = record.meta.contexts[context]
    return PromptTokens(tuple(range(len(strings))), tuple(strings))
