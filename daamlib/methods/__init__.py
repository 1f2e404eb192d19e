"""Heatmap methods: pure functions of a :class:`~daamlib.record.Record`, returning [H, W] latent-sized maps."""

from .concepts import ConceptAttention, concept_attention, concept_maps
from .daam import daam, daam_02_layers, token_maps
from .linear import linear, linear_maps
from .openvocab import openvocab, openvocab_maps
from ..layout import resize
from .protocol import DAAM, Attribution, HeatmapMethod, LinearDAAM, OpenVocabulary, OptimizedToken, vector_maps

__all__ = [
    "Attribution", "HeatmapMethod", "DAAM", "OpenVocabulary", "LinearDAAM", "OptimizedToken", "vector_maps", "ConceptAttention",
    "concept_attention", "concept_maps", "daam", "daam_02_layers", "token_maps", "linear", "linear_maps", "openvocab",
    "openvocab_maps", "resize"]
