"""Attention layers of a diffusers denoiser (UNet or DiT transformer), named by their module path, and the text
encoders whose tokens make the sequence those layers read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch

from ..modules import denoiser, family
from .flux import is_flux_attention

AttentionKind = Literal["cross", "joint", "self", "other"]  # "other": attention daamlib cannot read
TEXT_KINDS = ("cross", "joint")  # image queries attend to text keys: cross-attention, or MM-DiT joint attention (SD3, Flux)
_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}
_PROCESSOR_SUFFIX = ".processor"


@dataclass(frozen=True)
class AttentionLayer:
    """One attention module of the UNet.

    ``name`` is its diffusers module path, e.g. ``up_blocks.1.attentions.0.transformer_blocks.0.attn2``.
    """

    name: str
    kind: AttentionKind  # "joint": SD3's [image, text] or Flux's [text, image] attention over the block's own text
    heads: int
    head_dim: int
    key_dim: int  # dimension of what the text keys are projected from (d_text for cross-attention)

    @property
    def block(self) -> str:
        return self.name.split(".")[0]


def attention_layers(unet: torch.nn.Module, kind: AttentionKind | Literal["text"] | None = "text") -> list[AttentionLayer]:
    """The denoiser's attention layers of ``kind``: "text" (the default) for those whose image queries attend
    to text (cross and joint), one kind, or ``None`` for all; in U-Net order (down, mid, up), else module order."""
    layers = []
    for key in unet.attn_processors:
        name = key[: -len(_PROCESSOR_SUFFIX)]
        module = unet.get_submodule(name)
        layer_kind = _kind(module, family(unet) == "flux")
        if kind is not None and layer_kind != kind and not (kind == "text" and layer_kind in TEXT_KINDS):
            continue
        text_keys = getattr(module, "add_k_proj", None) or module.to_k  # Flux's single-stream blocks: one to_k
        inner_dim = module.to_q.out_features
        layers.append(AttentionLayer(name=name, kind=layer_kind, heads=module.heads, head_dim=inner_dim // module.heads,
                                     key_dim=text_keys.in_features))
    return sorted(layers, key=lambda layer: _BLOCK_ORDER.get(layer.block, len(_BLOCK_ORDER)))  # stable: module order within


def _kind(module: torch.nn.Module, flux_model: bool) -> AttentionKind:
    from diffusers.models.attention_processor import Attention

    if is_flux_attention(module):  # double- and single-stream blocks: [text, image] keys, rotary (see .flux)
        return "joint" if flux_model else "other"  # other models' FluxAttention (Chroma's masks) is not read
    if not isinstance(module, Attention):
        return "other"
    if getattr(module, "add_k_proj", None) is not None:  # SD3's JointAttnProcessor2_0: [image, text]
        return "joint"
    return "cross" if module.is_cross_attention else "self"


def select_layers(
    available: list[AttentionLayer], names: Iterable[str] | None
) -> list[AttentionLayer]:
    """The layers named in ``names`` (all of ``available`` when ``None``), with a clear error."""
    if names is None:
        return list(available)
    by_name = {layer.name: layer for layer in available}
    for name in names:
        if name not in by_name:
            listing = "\n  ".join(by_name)
            raise KeyError(f"{name!r} is not an attention layer of this model; choose from:\n  {listing}")
    return [by_name[name] for name in names]


def layer_resolution(num_positions: int, latent_size: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a layer whose maps have ``num_positions`` pixels inside a latent of ``latent_size``.

    The UNet halves each side with stride-2 convolutions (rounding up), so the layer's size is
    ``ceil(latent / 2**k)`` for its depth k.
    """
    height, width = latent_size
    while height * width > num_positions and (height > 1 or width > 1):
        height, width = math.ceil(height / 2), math.ceil(width / 2)
    if height * width != num_positions:
        raise ValueError(f"a layer with {num_positions} positions does not fit a {latent_size} latent "
                         "downsampled by powers of two")
    return height, width


def token_streams(pipe) -> list[tuple[str, str]]:
    """(text encoder, tokenizer) attribute names whose tokens make the denoiser's text sequence, in its order:
    CLIP (SD, SDXL, whose second CLIP shares the positions) or T5 (PixArt); SD3: CLIP, then T5; Flux: T5 alone
    (``text_encoder_2``; its CLIP gives only the pooled vector)."""
    kind = family(denoiser(pipe))
    streams = [("text_encoder_2", "tokenizer_2")] if kind == "flux" else [("text_encoder", "tokenizer")]
    if kind == "sd3":
        streams.append(("text_encoder_3", "tokenizer_3"))
    return [(encoder, tokenizer) for encoder, tokenizer in streams if getattr(pipe, encoder, None) is not None]
