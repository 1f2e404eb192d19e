"""ConceptAttention (Helbling et al., ICML 2025) in MM-DiT blocks: concept tokens that read the image, read by nothing.

Concept vectors: each concept (e.g. "car") is encoded alone by ``pipe.encode_prompt`` (the pipeline's default
``max_sequence_length``) and becomes one vector [d_encoder]: the mean of the encoder output over the concept's own
tokens in the last stream of the text sequence (T5 for SD3 and Flux; CLIP for SD3 without its T5). Like the prompt,
the k vectors enter through ``context_embedder``: c [N, k, C], one copy per traced image.

Each MM-DiT block (SD3's joint blocks, Flux's double-stream blocks) carries them with its own text-stream weights,
``temb`` = ``time_text_embed(timestep, [guidance,] pooled)`` of the call (d = head_dim, scale 1/sqrt(d)):
  ĉ, g = norm1_context(c, temb)                       AdaLN-Zero (SD3's last block: AdaLN, no gates)
  q_c, k_c, v_c = norm_added_q/k(add_q/k/v_proj(ĉ))   [N, heads, k, d]; Flux rotates them as its text (position 0)
  o_c = softmax(q_c [k_x, k_c]ᵀ / sqrt(d)) [v_x, v_c]   the concepts read image and concepts, never the prompt
  o_x = softmax(q_x [k_x, k_p]ᵀ / sqrt(d)) [v_x, v_p]   the image's own attention output (prompt p), unchanged
  c ← c + g_msa · to_add_out(o_c);  c ← c + g_mlp · ff_context(norm2_context(c) · (1 + s_mlp) + b_mlp)
The stream ends at SD3's last block (no ``to_add_out``) and at Flux's last double-stream block; nothing attends to
the concepts, so the image and prompt streams, and the image, are bit-identical. Per block, maps [N, hw, k]:
  "output" (ConceptAttention): softmax over the k concepts of o_x · o_cᵀ, with o_x [hw, heads*d] and o_c [k, heads*d]
      the attention outputs BEFORE the output projections (heads concatenated: the dot product sums the heads);
  "cross" (the cross-attention the paper compares with): softmax over the concepts of q_x · k_cᵀ / sqrt(d), per
      head, summed over heads.
The trace sums them over steps, per block (``Record.concept_output`` / ``concept_cross``).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F

from ..layout import split_heads
from ..modules import denoiser, execution_device, family
from ..tokens import PromptTokens
from .layers import token_streams

CONCEPT_FAMILIES = ("sd3", "flux")  # MM-DiTs with a separate text stream


def concept_stream(pipe, options) -> "ConceptStream | None":
    """The concept stream ``options.concepts`` asks for (None without concepts); refused where it is not defined."""
    if options.concepts is None:
        return None
    model = denoiser(pipe)
    if family(model) not in CONCEPT_FAMILIES:
        raise ValueError(f"concepts= runs ConceptAttention's concept stream through the text weights of MM-DiT blocks (SD3, "
                         f"Flux); {type(model).__name__} has none. For words outside the prompt there, trace with "
                         "contexts=[...] (open-vocabulary maps) or use daamlib.linear")
    if options.layers is not None:
        raise ValueError("the concept stream runs through every block, so concepts= traces them all: drop layers= and "
                         "choose blocks when reading the maps (daamlib.ConceptAttention(layers=[...]))")
    return ConceptStream(pipe, options.concepts, token_streams(pipe))


@torch.no_grad()
def encode_concepts(pipe, concepts: Sequence[str], streams: list[tuple[str, str]]) -> torch.Tensor:
    """One vector per concept [k, d_encoder] on the execution device. ``streams``: (text encoder, tokenizer)
    attribute names whose outputs make the denoiser's text sequence, in order (the last is read)."""
    ids: dict[str, torch.Tensor] = {}
    handles = [getattr(pipe, encoder).register_forward_pre_hook(partial(_keep_ids, ids, encoder), with_kwargs=True)
               for encoder, _ in streams]
    accepted = inspect.signature(pipe.encode_prompt).parameters  # SD3 requires prompt_2, prompt_3 (None: the prompt)
    options = {name: value for name, value in (("prompt_2", None), ("prompt_3", None), ("do_classifier_free_guidance", False))
               if name in accepted}
    vectors = []
    try:
        for concept in concepts:
            embeddings = pipe.encode_prompt(prompt=concept, device=execution_device(pipe), num_images_per_prompt=1,
                                            **options)[0][0]  # [n, d_encoder]
            encoder, tokenizer = streams[-1]
            offset = sum(ids[name].shape[-1] for name, _ in streams[:-1])  # SD3: T5 follows the 77 CLIP positions
            tokens = PromptTokens.from_ids(ids[encoder][0].tolist(), getattr(pipe, tokenizer))
            try:
                positions = [offset + i for i in tokens.token_indices(concept)]
            except KeyError:
                raise ValueError(f"the concept {concept!r} was read as {tokens.text!r} by {tokenizer}, which cuts it "
                                 "into other words; pass concepts as plain words such as 'car' or 'traffic light'") from None
            vectors.append(embeddings[positions].float().mean(dim=0))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(vectors)


def _keep_ids(store: dict, encoder: str, module, args, kwargs) -> None:
    store[encoder] = args[0] if args else kwargs["input_ids"]  # [1, n]


class ConceptStream:
    """The concept tokens' residual stream through one denoiser call at a time (see the module docstring)."""

    def __init__(self, pipe, concepts: Sequence[str], streams: list[tuple[str, str]]) -> None:
        self.model = denoiser(pipe)
        self.flux = family(self.model) == "flux"
        self.vectors = encode_concepts(pipe, concepts, streams)  # [k, d_encoder]
        self._call: tuple[dict, slice] | None = None  # the denoiser call's inputs and traced rows
        self._residual: torch.Tensor | None = None  # [N, k, C] entering the next block
        self._temb: torch.Tensor | None = None  # [N, C]

    def start_call(self, inputs: dict, rows: slice | None) -> None:
        """Before each denoiser call (``rows`` None: a call not traced). The stream starts at the first block, where
        offloaded weights are on their device."""
        self._call, self._residual = (None if rows is None else (inputs, rows)), None

    @torch.no_grad()
    def observe(self, layer: str, attn, image: torch.Tensor, text: torch.Tensor | None, rotary, image_attention):
        """The block of ``layer`` (its attention's module path). ``image`` [N, hw, C], ``text`` [N, n, C]: the traced
        rows of the normed streams its attention got; ``image_attention``: (image queries, image keys, text keys)
        [N, heads, positions, d] as the block computes them (normed; Flux: rotated). Returns the maps (output, cross)
        [N, hw, k] float32, or None where no concept stream runs (Flux's single-stream blocks, calls not traced)."""
        if self._call is None or text is None:
            return None
        block = self.model.get_submodule(layer.rpartition(".")[0])  # transformer_blocks.i of transformer_blocks.i.attn
        if self._residual is None:
            self._enter(image)
        pre_only = getattr(block, "context_pre_only", False)
        if pre_only:
            normed = block.norm1_context(self._residual, self._temb)
        else:
            normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(self._residual, emb=self._temb)
        q_x, k_x, k_p = image_attention
        v_x, v_p = split_heads(attn.to_v(image), attn.heads), split_heads(attn.add_v_proj(text), attn.heads)
        q_c, k_c, v_c = (split_heads(projection(normed), attn.heads) for projection in
                         (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q_c, k_c = (x if getattr(attn, norm) is None else getattr(attn, norm)(x) for x, norm in
                    ((q_c, "norm_added_q"), (k_c, "norm_added_k")))  # [N, heads, k, d]
        if self.flux:  # rotary over [text, image]; the concepts turn as text position 0 (Flux's text ids are zero)
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = (r[:1].expand(q_c.shape[2], -1) for r in rotary)  # [k, d]
            q_c, k_c = (apply_rotary_emb(x, (cos, sin), sequence_dim=2) for x in (q_c, k_c))
        o_x = F.scaled_dot_product_attention(q_x, torch.cat([k_x, k_p], 2), torch.cat([v_x, v_p], 2))  # [N, heads, hw, d]
        o_c = F.scaled_dot_product_attention(q_c, torch.cat([k_x, k_c], 2), torch.cat([v_x, v_c], 2))  # [N, heads, k, d]
        o_x, o_c = (o.transpose(1, 2).flatten(2) for o in (o_x, o_c))  # [N, hw | k, heads*d]
        output = torch.softmax(o_x.float() @ o_c.float().transpose(1, 2), dim=-1)  # [N, hw, k]
        cross = torch.softmax(q_x.float() @ k_c.float().transpose(-1, -2) / q_x.shape[-1] ** 0.5, dim=-1).sum(1)
        if not pre_only:
            c = self._residual + gate_msa[:, None] * attn.to_add_out(o_c)
            modulated = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            c = c + gate_mlp[:, None] * block.ff_context(modulated)
            self._residual = c.clip(-65504, 65504) if self.flux and c.dtype == torch.float16 else c  # as Flux's text
        return output, cross

    def _enter(self, like: torch.Tensor) -> None:
        """temb [N, C] and the concepts through ``context_embedder`` [N, k, C], as the model's forward makes them."""
        inputs, rows = self._call
        timestep, pooled, guidance = inputs["timestep"], inputs["pooled_projections"], inputs.get("guidance")
        conditions = (timestep, pooled)
        if self.flux:  # Flux's forward scales t and the guidance by 1000 in the model's dtype
            timestep = timestep.to(like.dtype) * 1000
            conditions = (timestep, pooled) if guidance is None else (timestep, guidance.to(like.dtype) * 1000, pooled)
        self._temb = self.model.time_text_embed(*conditions)[rows]
        embedded = self.model.context_embedder(self.vectors.to(like.dtype))  # [k, C]
        self._residual = embedded.expand(self._temb.shape[0], -1, -1)
