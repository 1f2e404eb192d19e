"""``trace(pipe)``: capture attention while a diffusers pipeline generates.

Per-instance processors go onto the traced layers with ``unet.set_attn_processor``; two
PyTorch forward pre-hooks watch the text encoder (which prompt ids were encoded) and the UNet
(batch layout, latent size, timestep). All of it is undone in ``finally``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from ..record import Record
from ..tokens import PromptTokens
from .accumulate import CaptureOptions, ContextKeys, GenerationState, split_per_image
from .layers import AttentionLayer, attention_layers, select_layers
from .processor import CaptureProcessor, split_heads


class Trace:
    """The live state of a trace. ``records`` holds one :class:`Record` per generated image."""

    def __init__(self, pipe, options: CaptureOptions, layers: list[AttentionLayer], cfg: bool | None,
                 contexts: dict[str, ContextKeys]) -> None:
        self.pipe = pipe
        self.options = options
        self.layers = layers
        self.cfg = cfg
        self.contexts = contexts
        self._finished: list[Record] = []
        self._current: GenerationState | None = None
        self._pending_ids: torch.Tensor | None = None  # [prompts, n] seen by the text encoder
        self._rows = slice(0, 0)
        self._last_timestep: float | None = None
        self._capture_self_attention = False

    # -- public -------------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        """Records of every image generated so far in this trace (finishes the current call)."""
        self._finish_current()
        return list(self._finished)

    # -- hooks --------------------------------------------------------------------------------
    def on_text_encoder(self, module, args, kwargs) -> None:
        if self._pending_ids is None:
            input_ids = args[0] if args else kwargs.get("input_ids")
            if input_ids is not None:
                self._pending_ids = input_ids.detach().cpu()

    def on_unet(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        context = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        timestep = float(torch.as_tensor(timestep).flatten()[0])
        batch = sample.shape[0]
        cfg = self._uses_cfg()
        if cfg and batch % 2:
            raise ValueError(f"classifier-free guidance with an odd batch of {batch}; pass cfg=False to trace")
        num_images = batch // 2 if cfg else batch
        if self.options.branch == "uncond" and not cfg:
            raise ValueError("branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
        starts_new = (
            self._current is None
            or self._pending_ids is not None
            or (self._last_timestep is not None and timestep > self._last_timestep)
        )
        if starts_new:
            self._finish_current()
            self._start(num_images, tuple(sample.shape[-2:]), context, cfg)
        elif num_images != self._current.num_images:
            raise ValueError(f"the batch changed from {self._current.num_images} to {num_images} images mid-generation")
        self._rows = self._traced_rows(num_images, cfg)
        self._current.timesteps.append(timestep)
        self._last_timestep = timestep
        self._capture_self_attention = self.options.self_attention and self._is_last_step(timestep)

    def _traced_rows(self, num_images: int, cfg: bool) -> slice:
        """diffusers batches CFG as [uncond x N, cond x N]; without CFG all N rows are conditional."""
        return slice(num_images, 2 * num_images) if cfg and self.options.branch == "cond" else slice(0, num_images)

    def _uses_cfg(self) -> bool:
        if self.cfg is not None:
            return self.cfg
        if not hasattr(self.pipe, "do_classifier_free_guidance"):
            raise ValueError(
                f"{type(self.pipe).__name__} does not say whether it uses classifier-free guidance; "
                "pass cfg=True or cfg=False to trace"
            )
        return bool(self.pipe.do_classifier_free_guidance)

    def _is_last_step(self, timestep: float) -> bool:
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        return timesteps is not None and len(timesteps) > 0 and float(timesteps[-1]) == timestep

    def _start(self, num_images: int, latent_size: tuple[int, int], context: torch.Tensor, cfg: bool) -> None:
        rows = self._traced_rows(num_images, cfg)
        token_ids = token_strings = added_tokens = None
        if self._pending_ids is not None:
            prompts = [PromptTokens.from_ids(ids.tolist(), self.pipe.tokenizer) for ids in self._pending_ids]
            for tokens in prompts:
                if tokens.maybe_truncated:
                    warnings.warn(
                        f"the prompt fills all {tokens.length} text-encoder tokens and may have been "
                        f"truncated; it was seen as {tokens.text!r}",
                        stacklevel=2,
                    )
            per_image = split_per_image(prompts, num_images)
            token_ids = [list(t.ids) for t in per_image]
            token_strings = [list(t.strings) for t in per_image]
            added_tokens = [list(t.added_tokens) for t in per_image]
        self._pending_ids = None
        self._current = GenerationState(
            options=self.options,
            num_images=num_images,
            latent_size=latent_size,
            token_ids=token_ids,
            token_strings=token_strings,
            added_tokens=added_tokens,
            text_embeddings=context[rows].detach().float(),
        )

    def _finish_current(self) -> None:
        if self._current is None:
            return
        state, self._current = self._current, None
        self._last_timestep = None
        unet = self.pipe.unet
        key_projections = {layer.name: unet.get_submodule(layer.name).to_k for layer in self.layers if layer.kind == "cross"}
        provenance = {
            "model_id": _model_id(self.pipe),
            "scheduler": type(self.pipe.scheduler).__name__,
            "image_size": _image_size(self.pipe, state.latent_size),
        }
        self._finished.extend(state.to_records(key_projections, self.contexts, provenance))

    # -- called by the processors ---------------------------------------------------------------
    def observe_cross_attention(self, layer, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        state = self._require_state(layer)
        if attention_mask is not None:
            raise ValueError(f"{layer.name} received an attention mask; masked cross-attention cannot be traced")
        _check_token_sequence(layer, hidden_states)
        hidden = hidden_states[self._rows]  # [N, hw, C]
        context = encoder_hidden_states[self._rows]  # [N, n, d_text]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        flat_queries = attn.to_q(hidden)  # [N, hw, inner]
        queries = _normed(attn, "norm_q", split_heads(flat_queries, attn.heads))  # [N, heads, hw, d]
        keys = _normed(attn, "norm_k", split_heads(attn.to_k(context), attn.heads))  # [N, heads, n, d]
        state.register_layer(layer, hidden.shape[1], attn.scale)
        context_keys = {
            phrase: _normed(attn, "norm_k", split_heads(attn.to_k(ctx.embeddings.to(hidden)[None]), attn.heads))[0]
            for phrase, ctx in self.contexts.items()
        }  # phrase -> [heads, m, d]
        state.add_cross_attention(layer, queries, keys, flat_queries, attn.scale, context_keys)

    def observe_self_attention(self, layer, attn, hidden_states, attention_mask) -> None:
        state = self._require_state(layer)
        if not self._capture_self_attention:
            return
        _check_token_sequence(layer, hidden_states)
        hidden = hidden_states[self._rows]  # [N, hw, C]
        queries = _normed(attn, "norm_q", split_heads(attn.to_q(hidden), attn.heads))
        keys = _normed(attn, "norm_k", split_heads(attn.to_k(hidden), attn.heads))
        values = split_heads(attn.to_v(hidden), attn.heads)
        state.register_layer(layer, hidden.shape[1], attn.scale)
        outputs = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=attn.scale)
        state.set_self_attention(layer, outputs)  # [N, heads, hw, head_dim]

    def _require_state(self, layer: AttentionLayer) -> GenerationState:
        if self._current is None:
            raise RuntimeError(f"{layer.name} ran outside a UNet call; trace only wraps pipeline generation")
        return self._current


def _check_token_sequence(layer: AttentionLayer, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3:
        raise ValueError(f"{layer.name} got hidden states of shape {tuple(hidden_states.shape)}; "
                         "only transformer-block attention ([batch, positions, channels]) can be traced")


def _normed(attn, norm_name: str, tensor: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, norm_name, None)
    return norm(tensor) if norm is not None else tensor


def _model_id(pipe) -> str | None:
    name = getattr(pipe, "name_or_path", None)
    return None if name is None else str(name)


def _image_size(pipe, latent_size: tuple[int, int]) -> tuple[int, int] | None:
    scale = getattr(pipe, "vae_scale_factor", None)
    return None if scale is None else (latent_size[0] * scale, latent_size[1] * scale)


def _encode_contexts(pipe, phrases: Iterable[str] | Mapping[str, torch.Tensor], include_padding: bool) -> dict[str, ContextKeys]:
    from ..text import TextEncoder

    if isinstance(phrases, Mapping):  # named conditioning vectors, e.g. optimized tokens
        contexts = {}
        for name, vectors in phrases.items():
            vectors = torch.as_tensor(vectors).detach().float()
            if vectors.ndim != 2:
                raise ValueError(f"context {name!r} must be vectors [m, d_text]; got shape {tuple(vectors.shape)}")
            contexts[name] = ContextKeys(embeddings=vectors, token_strings=[f"{name}[{i}]" for i in range(len(vectors))])
        return contexts
    encoder = TextEncoder(pipe)
    contexts = {}
    for phrase in phrases:
        encoded = encoder.encode(phrase)
        positions = encoded.key_positions(include_padding)
        contexts[phrase] = ContextKeys(
            embeddings=encoded.embeddings[positions].detach(),
            token_strings=[encoded.tokens.strings[i] for i in positions],
        )
    return contexts


@contextmanager
def trace(
    pipe,
    *,
    layers: Sequence[str] | None = None,
    daam: bool = True,
    per_head: bool = False,
    per_step: bool = False,
    queries: bool = False,
    query_layers: Sequence[str] | None = None,
    query_steps: Sequence[int] | None = None,
    query_dtype: torch.dtype = torch.float16,
    query_device: str = "cpu",
    linear: bool = False,
    self_attention: bool = False,
    contexts: Sequence[str] | Mapping[str, torch.Tensor] = (),
    context_padding: bool = False,
    upsample: str = "bilinear",
    branch: str = "cond",
    cfg: bool | None = None,
) -> Iterator[Trace]:
    """Capture attention during every pipeline call inside the ``with`` block.

    Args:
        layers: cross-attention layers to trace (module paths); ``None`` for all of them.
        daam, per_head, per_step: record softmax maps summed over steps and heads, and optionally
            kept per head (for ``mode="daam-0.2"``) or per step (layer x timestep analysis).
        queries, query_layers, query_steps, query_dtype, query_device: cache W_q h for
            open-vocabulary maps of any phrase later.
        linear: record the collapsed linear-DAAM matrix (memory independent of the step count).
        self_attention: record last-step per-head self-attention outputs of the up blocks (PCC).
        contexts: phrases attached as non-influencing keys (the re-run open-vocabulary path), or
            named conditioning vectors {name: [m, d_text]} such as optimized tokens;
            ``context_padding`` also attaches their padding tokens.
        upsample: "bilinear" or "bicubic", used to collapse the linear matrix.
        branch: "cond" (default) or "uncond" half of classifier-free guidance.
        cfg: override the pipeline's own ``do_classifier_free_guidance``.
    """
    options = CaptureOptions(
        daam=daam, per_head=per_head, per_step=per_step, queries=queries,
        query_layers=None if query_layers is None else tuple(query_layers),
        query_steps=None if query_steps is None else tuple(query_steps),
        query_dtype=query_dtype, query_device=query_device, linear=linear,
        self_attention=self_attention, upsample=upsample, branch=branch,
    )
    if not (daam or queries or linear or self_attention or contexts):
        raise ValueError("nothing to record: enable daam, queries, linear or self_attention, or pass contexts")
    unet = pipe.unet
    cross_layers = select_layers(attention_layers(unet, "cross"), layers)
    if query_layers is not None:
        select_layers(cross_layers, query_layers)  # validates the names
    self_layers = [l for l in attention_layers(unet, "self") if l.block == "up_blocks"] if self_attention else []
    traced = cross_layers + self_layers
    context_keys = _encode_contexts(pipe, contexts, context_padding) if contexts else {}
    tr = Trace(pipe, options, traced, cfg, context_keys)

    originals = unet.attn_processors
    processors = dict(originals)
    for layer in traced:
        key = f"{layer.name}.processor"
        processors[key] = CaptureProcessor(layer, originals[key], tr)
    handles = [unet.register_forward_pre_hook(tr.on_unet, with_kwargs=True)]
    if getattr(pipe, "text_encoder", None) is not None:
        handles.append(pipe.text_encoder.register_forward_pre_hook(tr.on_text_encoder, with_kwargs=True))
    unet.set_attn_processor(processors)
    try:
        yield tr
        tr._finish_current()
    except BaseException:
        tr._current = None  # a failed generation leaves no partial record
        raise
    finally:
        unet.set_attn_processor(dict(originals))  # the setter consumes the dict it is given
        for handle in handles:
            handle.remove()
