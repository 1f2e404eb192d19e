"""What each model family defines: maps of words the prompt does not hold, the methods scored beside DAAM, and
what the records keep for them (notebooks 00, 01-02, 06, 08, 10).

Where every cross-attention layer reads one conditioning space (SD 1.x/2.x/XL, PixArt) a new word gets an
open-vocabulary map (softmax over its keys, from the query cache) and a Linear DAAM map (the collapsed matrix).
In the joint attention of SD3 and Flux each block reads its own text stream, so a word outside the prompt has no
key there; ConceptAttention carries it through the blocks as a concept stream instead, and its two variants
(attention outputs, and queries against concept keys) stand in for the two maps. Its concepts for urban scenes
are the class words with the background things (``URBAN_CONCEPTS``), as the paper pairs each object with the
background concepts around it.
"""

from __future__ import annotations

import torch

import daamlib
from daamlib.methods import DAAM, ConceptAttention, HeatmapMethod, LinearDAAM, OpenVocabulary
from daamlib.modules import denoiser, family
from daamlab.toyworld.labels import BACKGROUND_WORDS

JOINT_ATTENTION_FAMILIES = ("sd3", "flux")
URBAN_CONCEPTS = tuple(BACKGROUND_WORDS.values())  # tree, road, sidewalk, building, sky


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


def concept_words(class_words) -> list[str]:
    """ConceptAttention's concepts for these class words: the words, then the urban background concepts."""
    return list(dict.fromkeys([*class_words, *URBAN_CONCEPTS]))


def dataset_trace_options(pipe, class_words) -> dict:
    """What a dataset's records keep besides DAAM and Linear DAAM: ConceptAttention's concepts on SD3 and Flux."""
    return {"concepts": concept_words(class_words)} if has_joint_attention(pipe) else {}


def scored_methods(pipe, openvocab_context: str) -> dict[str, HeatmapMethod]:
    """The methods scored on the class word beside DAAM: Linear DAAM and open-vocabulary maps, or ConceptAttention
    where joint attention has no open-vocabulary keys (records traced with :func:`new_word_trace_options`)."""
    methods: dict[str, HeatmapMethod] = {"DAAM": DAAM(), "Linear DAAM": LinearDAAM(pipe)}
    if has_joint_attention(pipe):
        methods["ConceptAttention"] = ConceptAttention()
    else:
        methods["open-vocabulary"] = OpenVocabulary(pipe, openvocab_context)
    return methods


def pcc_trace_options(pipe, class_words) -> dict:
    """What PCC's records keep (notebook 08): the self-attention features, and the class words as contexts for their
    open-vocabulary maps; on SD3 and Flux ConceptAttention's concepts instead, which ``build_dataset`` adds."""
    if has_joint_attention(pipe):
        return {"self_attention": True}
    return {"self_attention": True, "contexts": list(class_words)}
