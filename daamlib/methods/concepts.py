"""ConceptAttention (Helbling et al., ICML 2025): heatmaps of concept words traced with ``trace(concepts=[...])``.

Per block and step the trace keeps a softmax over the k concepts at every image token (see
``daamlib.capture.concepts``): ``variant="output"`` compares attention outputs, o_x · o_cᵀ (the paper's
ConceptAttention); ``variant="cross"`` image queries with concept keys, q_x · k_cᵀ / sqrt(d) (its cross-attention
baseline, per head, summed over heads). A concept's heatmap is its column summed over the chosen blocks and the
steps, upsampled to the latent: at every pixel the k concepts' values add up to blocks x steps (x heads for "cross").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..record import Record
from .common import check_record, chosen_layers, sum_upsampled
from .protocol import Attribution

VARIANTS = {"output": "concept_output", "cross": "concept_cross"}  # variant -> the record's field


def concept_maps(record: Record, *, variant: str = "output", layers: Sequence[str] | None = None,
                 upsample: str = "bilinear") -> torch.Tensor:
    """Every concept's heatmap [k, H, W], in the order of ``record.meta.concepts``."""
    check_record(record, "concept_maps")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)} ('output': ConceptAttention, 'cross': the "
                         f"cross-attention of image queries and concept keys), not {variant!r}")
    stored = getattr(record, VARIANTS[variant])
    if not stored:
        raise KeyError("this record holds no concept maps; trace an SD3 or Flux pipeline with concepts=['car', ...]")
    chosen = chosen_layers(record, layers, stored)
    return sum_upsampled(stored, chosen, record.latent_size, upsample)  # resize checks upsample


def concept_attention(record: Record, concept: str, *, variant: str = "output", layers: Sequence[str] | None = None,
                      upsample: str = "bilinear") -> torch.Tensor:
    """The heatmap [H, W] of one concept traced with ``trace(concepts=[...])``; see the module docstring."""
    check_record(record, "concept_attention")
    concepts = record.meta.concepts
    if concept not in concepts:
        listed = f"the traced concepts are {concepts}" if concepts else "none was traced"
        raise KeyError(f"{concept!r} is not a concept of this record ({listed}); trace with concepts=[..., {concept!r}]")
    return concept_maps(record, variant=variant, layers=layers, upsample=upsample)[concepts.index(concept)]


@dataclass(frozen=True)
class ConceptAttention:
    """ConceptAttention's heatmap of a concept word (``variant="output"``), or its cross-attention baseline
    (``variant="cross"``), summed over ``layers`` (None: every MM-DiT block) and steps."""

    variant: str = "output"
    layers: Sequence[str] | None = None
    upsample: str = "bilinear"
    name: str = "ConceptAttention"

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution:
        if occurrence != 0:
            raise ValueError(f"a concept is one vector, not a word of the prompt; occurrence={occurrence} has no meaning (use 0)")
        heatmap = concept_attention(record, word, variant=self.variant, layers=self.layers, upsample=self.upsample)
        return Attribution(heatmap, (str(word),), self.name)
