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

from ..layout import split_heads
from ..modules import check_same_model, denoiser, project
from ..record import Record
from ..text import TextEncoder
from ..tokens import PromptTokens
from .common import chosen_layers, select_steps, sum_upsampled


def openvocab(record: Record, context: str, word: str | None = None, *, pipe=None, occurrence: int = 0,
              layers: Sequence[str] | None = None, steps: Sequence[int] | None = None, include_padding: bool = False,
              upsample: str = "bilinear") -> torch.Tensor:
    """Heatmap of ``word`` inside ``context`` ([H, W]), or of every key token of ``context`` ([m, H, W]).

    Computed where the query cache lives (the pipeline's GPU when traced there); returned on the CPU."""
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"the context must be a non-empty phrase (str) such as 'a car and a tree in a street', not {context!r}")
    if not isinstance(include_padding, bool):
        raise TypeError(f"include_padding is True or False, not {include_padding!r}")
    if context in record.contexts and not (record.queries and steps is not None):
        tokens = _stored_context_tokens(record, context, include_padding, steps)
        chosen = chosen_layers(record, layers, record.contexts[context])
        maps = sum_upsampled(record.contexts[context], chosen, record.latent_size, upsample)
    elif record.queries:
        if pipe is None:
            raise ValueError("open-vocabulary maps from the query cache need pipe= (text encoder and W_k)")
        check_same_model(record.meta.model_fingerprint, pipe)
        encoded = TextEncoder(pipe).encode(context)
        positions = encoded.key_positions(include_padding)
        tokens = encoded.tokens
        maps = openvocab_maps(record, encoded.embeddings[positions], pipe, layers=layers, steps=steps, upsample=upsample)
    else:
        stored = f"; phrases attached by re-run: {sorted(record.contexts)}" if record.contexts else ""
        raise KeyError(f"the record has no query cache and no re-run maps for {context!r}{stored}: trace with queries=True, "
                       f"or re-run the seeded generation inside trace(contexts=[{context!r}])")
    maps = maps.detach().cpu()
    if word is None:
        return maps
    if isinstance(word, int) and not isinstance(word, bool) and not -len(maps) <= word < len(maps):
        raise IndexError(f"token index {word} is outside the {len(maps)} keys of {context!r} (SOT, its words, EOT"
                         f"{', padding' if len(maps) > tokens.eot_index + 1 else ''})")
    indices = list(tokens.token_indices(word, occurrence))  # words lie between SOT and EOT: always keys
    return maps[indices].mean(dim=0)


def openvocab_maps(record: Record, key_embeddings: torch.Tensor, pipe, *, layers: Sequence[str] | None = None,
                   steps: Sequence[int] | None = None, upsample: str = "bilinear") -> torch.Tensor:
    """Softmax maps over the keys made from ``key_embeddings`` [m, d_text] -> [m, H, W].

    Uses every cached (layer, step) query and computes on the device the queries live on (move a
    loaded record with ``record.to(device)`` once to work on a GPU); the result stays there.
    Differentiable in ``key_embeddings`` when they require grad; the model's own weights never get
    gradients here.
    """
    chosen = chosen_layers(record, layers, {layer for layer, _ in record.queries})
    wanted_steps = set(select_steps(record, steps))
    device = next(iter(record.queries.values())).device
    budget = _batch_elements(device)
    per_layer: dict[str, torch.Tensor] = {}
    with torch.set_grad_enabled(key_embeddings.requires_grad):
        key_embeddings = key_embeddings.to(device)
        for meta in chosen:
            step_queries = [query for (name, step), query in record.queries.items()  # [hw, inner] per chosen step
                            if name == meta.name and step in wanted_steps]
            if not step_queries:
                continue
            keys = project(denoiser(pipe).get_submodule(meta.name).to_k, key_embeddings)  # [m, inner]
            keys = split_heads(keys[None], meta.heads)[0]  # [heads, m, d]; W_k X' is the same every step
            steps_per_batch = max(1, budget // step_queries[0].numel())
            total = 0
            for start in range(0, len(step_queries), steps_per_batch):
                batch = torch.stack(step_queries[start : start + steps_per_batch]).float()  # [s, hw, inner]
                q = split_heads(batch, meta.heads)  # [s, heads, hw, d]
                # logits laid out [s, heads, m, hw]: the softmax over the few keys runs along pixels (4x faster on CPU)
                total = total + torch.softmax(keys @ q.transpose(-1, -2) * meta.scale, dim=-2).sum(dim=(0, 1))  # [m, hw]
            per_layer[meta.name] = total.T  # [hw, m]
        if not per_layer:
            raise KeyError("no cached queries match the chosen layers and steps")
        present = [layer for layer in chosen if layer.name in per_layer]
        return sum_upsampled(per_layer, present, record.latent_size, upsample)


_CPU_BATCH_ELEMENTS = 2**24  # float32 query values batched into one matmul on the CPU (cache-friendly)
_DEVICE_MEMORY_SHARE = 4  # on a GPU, a batch of steps may use a quarter of the free memory


def _batch_elements(device: torch.device) -> int:
    """How many float32 query values one batched matmul may hold on ``device``."""
    if device.type != "cuda":
        return _CPU_BATCH_ELEMENTS
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # the float32 copy of the queries and their logits' gradients: about 3 copies of 4 bytes
    return max(_CPU_BATCH_ELEMENTS, free_bytes // (_DEVICE_MEMORY_SHARE * 3 * 4))


def _stored_context_tokens(record: Record, context: str, include_padding: bool, steps) -> PromptTokens:
    """The key tokens of a phrase attached by re-run; its maps are a softmax over exactly these keys."""
    if steps is not None:
        raise ValueError(f"the re-run maps of {context!r} are summed over steps; steps= needs a query cache "
                         "(trace with queries=True)")
    strings = record.meta.contexts[context]
    tokens = PromptTokens(tuple(range(len(strings))), tuple(strings))
    stored_padding = len(strings) > tokens.eot_index + 1
    if stored_padding != include_padding:
        attached = "with" if stored_padding else "without"
        raise ValueError(f"{context!r} was attached {attached} its padding keys (trace(context_padding={stored_padding})), "
                         f"so its softmax maps cannot be read with include_padding={include_padding}; pass "
                         f"include_padding={stored_padding} or re-run with context_padding={include_padding}")
    return tokens
