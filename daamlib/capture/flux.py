"""Flux (``FluxTransformer2DModel``, ``FluxPipeline``): what the trace reads differently there.

Attention: each block's ``FluxAttention`` computes one softmax over the keys of the joint sequence
[text, image]. Double-stream blocks project the text stream (``add_q_proj``/``add_k_proj``, then
``norm_added_q``/``norm_added_k``) and the image stream (``to_q``/``to_k``, ``norm_q``/``norm_k``) apart;
single-stream blocks get [text, image] already joined and project it with ``to_q``/``to_k``. Queries and
keys are RMS-normed per head, then rotated by the rotary embedding of their position in the joint
sequence; the scale is SDPA's default 1/sqrt(head_dim). **DAAM on Flux** is, for the image queries, the
text columns of that softmax over all keys [text, image], summed over heads, steps and layers, double-
and single-stream blocks alike; every such layer is recorded as kind "joint".

Inputs: the transformer sees packed latents [B, h*w, 4C] (2x2 patches of the VAE latent), so the token
grid (h, w) comes from ``img_ids`` [h*w, 3] = (0, row, column); the VAE latent is (2h, 2w).

Guidance: Flux-dev is guidance-distilled, so the batch holds the prompt only. With ``true_cfg_scale > 1``
and a negative prompt, the pipeline calls the transformer a second time per step, prompt first, then the
negative prompt, on the same latents; :class:`FluxReader` tells the calls apart without reading values.
"""

from __future__ import annotations

import math

import torch


PATCH = 2  # the pipeline packs 2x2 latent pixels into one token


def is_flux_attention(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "FluxAttention"


NO_NEGATIVE_CALLS = ("branch='uncond' traces the negative prompt's transformer calls, which FluxPipeline makes only with "
                     "true classifier-free guidance: pass negative_prompt= and true_cfg_scale > 1 (guidance_scale is "
                     "Flux's distilled guidance, not CFG)")


def token_grid(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """(h, w) of the image tokens, from ``img_ids`` (0, row, column). Packed latents do not carry the grid,
    so this is the one host read of a Flux generation, made when it starts; later calls read nothing."""
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids  # 3-D ids are deprecated, still accepted by the model
    rows, cols = (int(v) + 1 for v in ids[:, 1:].amax(dim=0).tolist())
    if ids.shape[0] != num_tokens or rows * cols != num_tokens:
        raise ValueError(f"img_ids of shape {tuple(img_ids.shape)} reaching row {rows - 1}, column {cols - 1} do not lay "
                         f"out the {num_tokens} image tokens as one grid; only text-to-image Flux calls can be traced")
    return rows, cols


def _heads(attn, projected: torch.Tensor) -> torch.Tensor:
    return projected.unflatten(-1, (-1, attn.head_dim))  # [N, S, heads, head_dim], the processor's layout


class FluxReader:
    """How a trace reads Flux's transformer calls: batch layout, latent size, timestep and joint attention (as
    :class:`daamlib.capture.trace.BatchedReader` reads the other families'). A step is one prompt call; only the calls
    of ``branch`` are traced, never a mix (see the module docstring).

    The pipeline passes the same prompt-embedding tensor at every step, and the negative call of a step gets the very
    latents tensor its prompt call got. Both are compared by identity (references are kept, so a freed tensor's memory
    taken by a new one is never mistaken for it); no value is read."""

    def __init__(self, model: torch.nn.Module, options) -> None:
        """Refuses what would be read wrongly: Flux built from the generic ``Attention`` by older diffusers (its rotary
        embeddings and [text, image] order would be missed), and ``cfg=True`` (no Flux batch holds two halves)."""
        if not any(is_flux_attention(m) for m in model.modules()):
            raise NotImplementedError("this diffusers builds Flux's blocks from the generic Attention class; daamlib "
                                      "reads Flux through FluxAttention (newer diffusers): upgrade diffusers to trace Flux")
        if options.cfg:
            raise ValueError("cfg=True says each batch holds [negative, prompt] halves; Flux's never does (its guidance "
                             "is distilled; true CFG calls the transformer again with the negative prompt, and the trace "
                             "tells those calls apart itself): leave cfg unset, and choose the negative prompt's with "
                             "branch='uncond'")
        self.uncond = options.branch == "uncond"
        self.prompt: torch.Tensor | None = None
        self.latents: torch.Tensor | None = None
        self.prompt_calls = self.negative_calls = 0
        self.text_length = 0  # text positions of the current call (its single-stream blocks see [text, image])

    def read(self, inputs: dict, fresh: bool, complete: bool, encoder_calls: dict[str, list]):
        """(latent size when the call starts a generation, else None; images; the traced rows or None; timestep or
        None: the negative call of a step). ``fresh``: a generation must start (none yet, or the text encoders ran);
        ``complete``: the current one has had all its prompt calls (its last negative call may still come);
        ``encoder_calls``: the text encoders' calls since the last transformer call."""
        latents, context = inputs["hidden_states"], inputs["encoder_hidden_states"]  # [B, h*w, 4C], [B, n, d_text]
        call = self._classify(latents, context, fresh, complete)
        latent_size = self._latent_size(inputs, encoder_calls) if call == "start" else None
        if call == "prompt" and self.uncond and self.negative_calls < self.prompt_calls - 1:
            raise ValueError(NO_NEGATIVE_CALLS)
        self.text_length = context.shape[1]
        traced = (call == "negative") == self.uncond
        # the model gets t / 1000; the record keeps the scheduler's scale of t, as for SD3
        timestep = torch.as_tensor(inputs["timestep"]).detach().reshape(-1)[0].float() * 1000
        rows = slice(0, latents.shape[0]) if traced else None
        return latent_size, latents.shape[0], rows, None if call == "negative" else timestep

    def _classify(self, latents: torch.Tensor, context: torch.Tensor, fresh: bool, complete: bool) -> str:
        """"start", "prompt" or "negative"."""
        if not fresh and context is not self.prompt and latents is self.latents and self.negative_calls < self.prompt_calls:
            self.negative_calls += 1
            return "negative"
        if not fresh and not complete and context is self.prompt:
            self.latents = latents
            self.prompt_calls += 1
            return "prompt"
        self.prompt, self.latents, self.prompt_calls, self.negative_calls = context, latents, 1, 0
        return "start"

    def _latent_size(self, inputs: dict, encoder_calls: dict[str, list]) -> tuple[int, int]:
        """The VAE latent (2h, 2w) of a generation that starts."""
        if self.uncond and any(len(calls) == 1 for calls in encoder_calls.values()):
            raise ValueError(NO_NEGATIVE_CALLS)  # only the prompt was encoded
        rows, cols = token_grid(inputs["img_ids"], inputs["hidden_states"].shape[1])  # reads img_ids once per generation
        return PATCH * rows, PATCH * cols

    def joint_attention(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                        rotary: tuple[torch.Tensor, torch.Tensor]):
        """(image queries, image keys, text keys) [N, heads, positions, head_dim] as the block's attention computes them:
        projected, RMS-normed per head, rotated by their positions in [text, image]; and the softmax scale, SDPA's
        default (FluxAttnProcessor sets none). ``encoder_hidden_states``: the text stream of a double-stream block;
        None in a single-stream block, whose input joins [text, image]."""
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            text, image = hidden_states[:, :self.text_length], hidden_states[:, self.text_length:]
            text_keys = attn.norm_k(_heads(attn, attn.to_k(text)))
        else:
            text, image = encoder_hidden_states, hidden_states
            text_keys = attn.norm_added_k(_heads(attn, attn.add_k_proj(text)))
        queries, image_keys = attn.norm_q(_heads(attn, attn.to_q(image))), attn.norm_k(_heads(attn, attn.to_k(image)))
        if rotary is None:
            raise ValueError("a Flux attention call came without image_rotary_emb; only FluxTransformer2DModel's calls "
                             "are traced")
        cos, sin = rotary  # [text + image positions, head_dim]
        n = text.shape[1]
        if cos.shape[0] != n + image.shape[1]:
            raise ValueError(f"Flux's rotary embedding covers {cos.shape[0]} positions, not {n} text + {image.shape[1]} "
                             "image tokens")

        def rotated(x: torch.Tensor, positions: slice) -> torch.Tensor:  # [N, S, heads, d] -> [N, heads, S, d]
            return apply_rotary_emb(x, (cos[positions], sin[positions]), sequence_dim=1).transpose(1, 2)

        pixels, scale = slice(n, None), 1 / math.sqrt(attn.head_dim)  # the image's positions in [text, image]
        return rotated(queries, pixels), rotated(image_keys, pixels), rotated(text_keys, slice(0, n)), scale
