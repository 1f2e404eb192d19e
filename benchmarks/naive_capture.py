"""The naive way to capture DAAM, for comparison: what the original ``daam`` package does.

Every cross-attention layer computes its attention probabilities explicitly (no fused SDPA
kernel), and at every step each head's maps are upsampled to the latent size (bicubic) and added
to a running sum. daamlib instead sums at each layer's native resolution and upsamples once per
layer when a heatmap is asked for; by linearity both give the same DAAM maps, which
:func:`naive_daam` lets the benchmark check.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from daamlib import attention_layers


class NaiveUpsamplingProcessor:
    """Explicit attention; the conditional rows' maps upsampled and summed at every call."""

    def __init__(self, sums: dict[str, torch.Tensor], name: str, latent_size: tuple[int, int], cfg: bool) -> None:
        self.sums, self.name, self.latent_size, self.cfg = sums, name, latent_size, cfg

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if hidden_states.ndim != 3 or attn.group_norm is not None or attn.spatial_norm is not None or attn.residual_connection:
            raise ValueError(f"{self.name}: the naive capture handles transformer-block cross-attention only")
        context = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))  # [B*heads, hw, head_dim]
        key = attn.head_to_batch_dim(attn.to_k(context))  # [B*heads, n, head_dim]
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # [B*heads, hw, n]
        output = attn.batch_to_head_dim(torch.bmm(probs, value))
        output = attn.to_out[1](attn.to_out[0](output))
        self._accumulate(probs.detach(), attn.heads)
        return output / attn.rescale_output_factor

    def _accumulate(self, probs: torch.Tensor, heads: int) -> None:
        batch = probs.shape[0] // heads
        rows = slice(batch // 2, batch) if self.cfg else slice(0, batch)
        probs = probs.view(batch, heads, *probs.shape[1:])[rows]  # [N, heads, hw, n]
        height, width = self.latent_size
        factor = math.isqrt(height * width // probs.shape[2])
        maps = probs.transpose(-1, -2).reshape(-1, probs.shape[-1], height // factor, width // factor)  # [N*heads, n, h, w]
        up = F.interpolate(maps.float(), size=self.latent_size, mode="bicubic", align_corners=False)
        up = up.view(-1, heads, *up.shape[1:]).sum(dim=1)  # [N, n, H, W]
        self.sums[self.name] = up if self.name not in self.sums else self.sums[self.name] + up


@contextmanager
def naive_trace(pipe, latent_size: tuple[int, int], cfg: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Install the naive processor on every cross-attention layer; yields {layer: [N, n, H, W]} sums."""
    unet = pipe.unet
    originals = unet.attn_processors
    sums: dict[str, torch.Tensor] = {}
    processors = dict(originals)
    for layer in attention_layers(unet, "cross"):
        processors[f"{layer.name}.processor"] = NaiveUpsamplingProcessor(sums, layer.name, latent_size, cfg)
    unet.set_attn_processor(processors)
    try:
        yield sums
    finally:
        unet.set_attn_processor(dict(originals))


def naive_daam(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """The DAAM maps of every token summed over layers.  [N, n, H, W]"""
    return torch.stack(list(sums.values())).sum(dim=0)
