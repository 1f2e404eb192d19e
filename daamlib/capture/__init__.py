"""Attention capture inside the UNet of a diffusers pipeline."""

from .layers import AttentionLayer, attention_layers, layer_resolution
from .options import TraceOptions
from .trace import Trace, trace

__all__ = ["AttentionLayer", "attention_layers", "layer_resolution", "Trace", "TraceOptions", "trace"]
