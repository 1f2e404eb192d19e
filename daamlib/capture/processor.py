"""The attention processor a trace installs on each traced layer.

It delegates the layer's output to the processor that was there before (so generation is
bit-for-bit unchanged and untraced layers keep their fast SDPA path), then recomputes what the
trace needs for the rows of the traced branch only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .layers import AttentionLayer

if TYPE_CHECKING:
    from .trace import Trace


class CaptureProcessor:
    """Wraps a layer's original processor and reports the layer's inputs to the trace."""

    def __init__(self, layer: AttentionLayer, original, trace: "Trace") -> None:
        self.layer = layer
        self.original = original
        self.trace = trace

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        output = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        with torch.no_grad():
            if self.layer.kind == "cross":
                self.trace.observe_cross_attention(self.layer, attn, hidden_states, encoder_hidden_states, attention_mask)
            elif self.layer.kind == "joint":
                if attention_mask is not None:
                    raise ValueError(f"{self.layer.name} got an attention mask; joint attention is traced without masks")
                rotary = args[0] if args else kwargs.get("image_rotary_emb")  # Flux passes it 5th, positionally
                self.trace.observe_joint_attention(self.layer, attn, hidden_states, encoder_hidden_states, rotary)
            else:
                self.trace.observe_self_attention(self.layer, attn, hidden_states, attention_mask)
        return output
