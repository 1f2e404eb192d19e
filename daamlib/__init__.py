"""daamlib: what a text-to-image diffusion model attends to, word by word."""

__version__ = "0.1.0"

from .attribution import attribute_image
from .capture import TraceOptions, attention_layers, trace
from .generation import generate
from .methods import (ConceptAttention, concept_attention, concept_maps, daam, linear, linear_maps, openvocab, openvocab_maps,
                      resize, token_maps)
from .metrics import binarize, iou, iou_curve, normalize, pearson, summarize, thresholds
from .models import load_pipeline
from .optimize import OptimizedTokens, optimize_tokens
from .record import Record, load_record
from .text import TextEncoder
from .tokens import EOT, SOT, PromptTokens

__all__ = [
    "__version__", "trace", "TraceOptions", "attention_layers", "generate", "attribute_image", "daam", "token_maps", "linear", "linear_maps",
    "openvocab", "openvocab_maps", "ConceptAttention", "concept_attention", "concept_maps", "resize", "binarize", "iou", "iou_curve", "normalize", "pearson",
    "summarize", "thresholds", "load_pipeline", "OptimizedTokens", "optimize_tokens", "Record",
    "load_record", "TextEncoder", "PromptTokens", "SOT", "EOT",
]
