"""What a trace records, as one public object: ``trace(pipe, TraceOptions(...))`` or ``trace(pipe, **fields)``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..layout import check_upsample_mode
from ..selection import layer_names, step_indices


@dataclass(frozen=True)
class TraceOptions:
    """Everything is summed at native resolution in float32; tensors stay on the pipeline's device
    until the generation ends.

    layers: cross-attention layers to trace (module paths); None for all of them.
    daam, per_head, per_step: softmax maps summed over steps and heads, and optionally kept per head
        (for ``mode="daam-0.2"``) or per step (layer x timestep analysis).
    queries, query_layers, query_steps, query_dtype, query_device: cache W_q h for open-vocabulary
        maps of any phrase later. ``query_device=None`` keeps the cache where the UNet computes (no
        copies, no waiting); ``"cpu"`` streams it into pinned host memory with non-blocking copies.
    linear: the collapsed linear-DAAM matrix (memory independent of the step count).
    self_attention: last-step per-head self-attention outputs of the up blocks (PCC); on SD3 and Flux, of the image
        tokens in the later half of the traced joint blocks (their softmax runs over image and text keys together).
    contexts: phrases attached as non-influencing keys (the re-run open-vocabulary path), or named
        conditioning vectors {name: [m, d_text]} such as optimized tokens; ``context_padding`` also
        attaches their padding tokens.
    concepts: words (e.g. ["car", "tree", "sky"]) carried through SD3's or Flux's MM-DiT blocks as ConceptAttention's
        concept stream, read by nothing (see ``daamlib.capture.concepts``); records their maps per block.
    upsample: "bilinear" or "bicubic", used to collapse the linear matrix.
    branch: "cond" (default) or "uncond" half of classifier-free guidance.
    cfg: for pipelines that do not say whether they use classifier-free guidance; a value that
        contradicts the pipeline's own is refused.
    """

    layers: Sequence[str] | None = None
    daam: bool = True
    per_head: bool = False
    per_step: bool = False
    queries: bool = False
    query_layers: Sequence[str] | None = None
    query_steps: Sequence[int] | None = None
    query_dtype: torch.dtype = torch.float16
    query_device: str | None = None
    linear: bool = False
    self_attention: bool = False
    contexts: Sequence[str] | Mapping[str, torch.Tensor] = ()
    context_padding: bool = False
    concepts: Sequence[str] | None = None
    upsample: str = "bilinear"
    branch: str = "cond"
    cfg: bool | None = None

    def __post_init__(self) -> None:
        for name in ("daam", "per_head", "per_step", "queries", "linear", "self_attention", "context_padding"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} is True or False, not {getattr(self, name)!r}")
        check_upsample_mode(self.upsample)
        if self.branch not in ("cond", "uncond"):
            raise ValueError(f"branch must be 'cond' or 'uncond', not {self.branch!r}")
        if self.cfg not in (None, True, False):
            raise TypeError(f"cfg is None, True or False, not {self.cfg!r}")
        if self.query_device not in (None, "cpu"):
            raise ValueError(f"query_device must be None (where the UNet computes) or 'cpu', not {self.query_device!r}")
        if not isinstance(self.query_dtype, torch.dtype) or not self.query_dtype.is_floating_point:
            raise ValueError(f"query_dtype must be a floating dtype such as torch.float16, not {self.query_dtype}")
        for name in ("layers", "query_layers"):
            object.__setattr__(self, name, layer_names(getattr(self, name), name))
        object.__setattr__(self, "query_steps", step_indices(self.query_steps, "query_steps"))
        if isinstance(self.contexts, str):
            raise ValueError(f"contexts must be a list of phrases, not the string {self.contexts!r}; "
                             f"pass contexts=[{self.contexts!r}]")
        if self.concepts is not None:
            object.__setattr__(self, "concepts", _concept_words(self.concepts))
        if not (self.daam or self.queries or self.linear or self.self_attention or self.contexts or self.concepts):
            raise ValueError("nothing to record: enable daam, queries, linear or self_attention, or pass contexts or concepts")

    def wants_queries(self, layer: str, step: int) -> bool:
        return (
            self.queries
            and (self.query_layers is None or layer in self.query_layers)
            and (self.query_steps is None or step in self.query_steps)
        )


def _concept_words(concepts) -> tuple[str, ...]:
    example = "concepts=['car', 'tree', 'sky']"
    if isinstance(concepts, str) or not isinstance(concepts, Sequence):
        raise ValueError(f"concepts is a list of words such as {example}, not {concepts!r}")
    if not concepts:
        raise ValueError(f"concepts=[] names no concept; pass words such as {example}, or leave concepts unset")
    for concept in concepts:
        if not isinstance(concept, str) or not concept.strip():
            raise TypeError(f"each concept is a non-empty word (str), not {concept!r}; e.g. {example}")
    if len(set(concepts)) < len(concepts):
        raise ValueError(f"concepts {list(concepts)} repeat a word; name each concept once")
    return tuple(concepts)
