"""Maps of words the prompt does not hold, by what the model family defines (notebook 00).

Where every cross-attention layer reads one conditioning space (SD 1.x/2.x/XL, PixArt) a new word gets an
open-vocabulary map (softmax over its keys, from the query cache) and a Linear DAAM map (the collapsed matrix).
In the joint attention of SD3 and Flux each block reads its own text stream, so a word outside the prompt has no
key there; ConceptAttention carries it through the blocks as a concept stream instead, and its two variants
(attention outputs, and queries against concept keys) stand in for the two maps.
"""

from __future__ import annotations

import torch

import daamlib
from daamlib.modules import denoiser, family

JOINT_ATTENTION_FAMILIES = ("sd3", "flux")


def has_joint_attention(pipe) -> bool:
    """Whether the pipeline's denoiser is an MM-DiT (SD3, Flux) whose blocks each project their own text stream."""
    return family(denoiser(pipe)) in JOINT_ATTENTION_FAMILIES


def new_word_trace_options(pipe, words: list[str]) -> dict:
    """The ``generate``/``trace`` options that let :func:`new_word_maps` map ``words`` afterwards."""
    if has_joint_attention(pipe):
        return {"linear": True, "concepts": list(words)}
    return {"linear": True, "queries": True}


def new_word_maps(record, words: list[str], pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Two kinds of map for each new word: {kind: {word: [H, W]}}, the softmax kind first."""
    if record.meta.concepts:
        return {"ConceptAttention": {w: daamlib.concept_attention(record, w) for w in words},
                "ConceptAttention, cross-attention variant": {w: daamlib.concept_attention(record, w, variant="cross")
                                                              for w in words}}
    return {"open-vocabulary": {w: daamlib.openvocab(record, w, w, pipe=pipe) for w in words},
            "linear": {w: daamlib.linear(record, w, pipe=pipe) for w in words}}
