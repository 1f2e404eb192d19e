"""``trace(pipe)``: capture attention while a diffusers pipeline generates.

Per-instance processors go onto the traced layers with the denoiser's ``set_attn_processor``; two
PyTorch forward pre-hooks watch the text encoder (which prompt ids were encoded) and the denoiser
(batch layout, latent size, timestep). All of it is undone in ``finally``. The denoiser is the UNet of
Stable Diffusion 1.x/2.x/XL, the transformer of PixArt-α/Σ (cross-attention ``attn2`` over T5, with the
padding mask the model applies), or the joint attention of SD3 and Flux (see ``.flux``).
"""

from __future__ import annotations

import dataclasses
import inspect
from contextlib import contextmanager
from functools import partial
from typing import Iterable, Iterator, Mapping

import torch

from ..modules import conditioning, denoiser, execution_device, family, model_fingerprint
from ..record import Record
from .accumulate import ContextKeys, GenerationState
from .concepts import ConceptStream, concept_stream
from .flux import FluxReader
from .options import TraceOptions
from .layers import AttentionLayer, attention_layers, select_layers, token_streams
from ..layout import split_heads
from .processor import CaptureProcessor


class Trace:
    """The live state of a trace. ``records`` holds one :class:`Record` per generated image.

    Nothing here reads a tensor's value while the pipeline runs: timesteps, token ids and sums
    stay where the pipeline computes until ``records`` is read after the generation, so a traced
    generation on CUDA never waits for the host.
    """

    def __init__(self, pipe, options: TraceOptions, layers: list[AttentionLayer],
                 contexts: dict[str, ContextKeys], fingerprint: dict, unet_calls: int | None = None,
                 concepts: ConceptStream | None = None) -> None:
        self.pipe = pipe
        self.denoiser = denoiser(pipe)
        self._forward_signature = inspect.signature(self.denoiser.forward)
        self.options = options
        self.unet_calls = unet_calls  # set when the caller drives the UNet itself (see trace)
        self.layers = layers
        self.contexts = contexts
        self.concepts = concepts  # ConceptAttention's concept stream (SD3, Flux), or None
        joint = [layer.name for layer in layers if layer.kind == "joint"]  # PCC on SD3/Flux: the later half of the blocks
        self._joint_self = set(joint[len(joint) // 2:]) if options.self_attention else set()
        self.fingerprint = fingerprint
        self._records: list[Record] = []
        self._finished: list[GenerationState] = []  # generations whose records are not built yet
        self._current: GenerationState | None = None
        self._encoder_ids: dict[str, list[torch.Tensor]] = {}  # encoder -> [prompts, n] per call since the last denoiser call
        self._context_keys: dict[str, dict[str, torch.Tensor]] = {}  # layer -> phrase -> [heads, m, d]
        self._rows: slice | None = slice(0, 0)  # None: this call is of the branch not traced (Flux's true CFG)
        flux = family(self.denoiser) == "flux"  # its reader refuses what it cannot read
        self.reader = FluxReader(self.denoiser, options) if flux else BatchedReader(pipe, options, unet_calls)

    # -- public -------------------------------------------------------------------------------
    @property
    def records(self) -> list[Record]:
        """Records of every image generated so far in this trace (finishes the current call)."""
        self._finish_current()
        self._build_records()
        return list(self._records)

    # -- hooks --------------------------------------------------------------------------------
    def on_text_encoder(self, encoder: str, module, args, kwargs) -> None:
        """Keeps the ids ``pipe.<encoder>`` sees (diffusers encodes the prompt, then the negative prompt)."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None:
            self._encoder_ids.setdefault(encoder, []).append(input_ids.detach())

    def on_denoiser(self, module, args, kwargs) -> None:
        inputs = self._forward_signature.bind_partial(*args, **kwargs).arguments  # UNet and DiT order their inputs differently
        fresh = self._current is None or bool(self._encoder_ids)  # a generation must start: none yet, or prompts encoded
        complete = fresh or self._current.complete
        latent_size, num_images, self._rows, timestep = self.reader.read(inputs, fresh, complete, self._encoder_ids)
        if latent_size is not None:  # the call starts a generation
            self._finish_current()
            self._start(num_images, latent_size)
        elif num_images != self._current.num_images:
            raise ValueError(f"the batch changed from {self._current.num_images} to {num_images} images mid-generation")
        if timestep is not None:  # None: the negative prompt's call of a step (Flux's true CFG)
            self._current.timesteps.append(timestep)
        if self._rows is not None and self._current.text_embeddings is None:  # the traced branch's first call
            context = inputs["encoder_hidden_states"][self._rows]  # [N, n, d_text]
            self._current.text_embeddings = conditioning(self.pipe, context.detach()).float()
        if self.concepts is not None:
            self.concepts.start_call(inputs, self._rows)

    def _expected_steps(self) -> int | None:
        """How many UNet calls this generation makes (diffusers sets it before its denoising loop)."""
        if self.unet_calls is not None:
            return self.unet_calls
        steps = getattr(self.pipe, "_num_timesteps", None)  # PixArt's pipeline does not set it
        if steps is not None:
            return steps
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        return None if timesteps is None else len(timesteps)

    def _start(self, num_images: int, latent_size: tuple[int, int]) -> None:
        encoder_calls, self._encoder_ids = self._encoder_ids, {}
        call = 1 if self.options.branch == "uncond" else 0  # the negative prompt is encoded second
        streams = [(encoder_calls[name][call], getattr(self.pipe, tokenizer)) for name, tokenizer in token_streams(self.pipe)
                   if len(encoder_calls.get(name, [])) > call]  # none when the prompt came as embeddings
        if streams and num_images % streams[0][0].shape[0]:
            raise ValueError(f"{num_images} images cannot come from {streams[0][0].shape[0]} prompts")
        expected_steps = self._expected_steps()
        wanted = self.options.query_steps if self.options.queries else None
        if wanted and expected_steps is not None and max(wanted) >= expected_steps:
            raise ValueError(f"query_steps {sorted(wanted)} reach past this generation's {expected_steps} UNet calls "
                             f"(steps 0..{expected_steps - 1}); choose steps inside that range")
        self._current = GenerationState(options=self.options, num_images=num_images, latent_size=latent_size,
                                        token_streams=streams, expected_steps=expected_steps)

    def _finish_current(self) -> None:
        if self._current is not None:
            self._finished.append(self._current)
            self._current = None

    def _abandon_unfinished(self) -> None:
        """After an exception: a generation that ran all its steps is kept, a partial one is dropped."""
        if self._current is not None and not self._current.complete:
            self._current = None
        self._finish_current()

    def _build_records(self) -> None:
        """Turn finished generations into records (reads tensors: only after the generation)."""
        finished, self._finished = self._finished, []
        name, scale = getattr(self.pipe, "name_or_path", None), getattr(self.pipe, "vae_scale_factor", None)
        for state in finished:
            height, width = state.latent_size
            provenance = {"model_id": None if name is None else str(name), "model_fingerprint": self.fingerprint,
                          "scheduler": type(self.pipe.scheduler).__name__,
                          "image_size": None if scale is None else (height * scale, width * scale)}
            self._records.extend(state.to_records(self.denoiser, self.contexts, provenance))

    # -- called by the processors ---------------------------------------------------------------
    def observe_cross_attention(self, layer, attn, hidden_states, encoder_hidden_states, attention_mask) -> None:
        state = self._require_state(layer)
        _check_token_sequence(layer, hidden_states)
        hidden = hidden_states[self._rows]  # [N, hw, C]
        context = encoder_hidden_states[self._rows]  # [N, n, d_text]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        flat_queries = attn.to_q(hidden)  # [N, hw, inner]
        queries = _normed(attn, "norm_q", split_heads(flat_queries, attn.heads))  # [N, heads, hw, d]
        keys = _normed(attn, "norm_k", split_heads(attn.to_k(context), attn.heads))  # [N, heads, n, d]
        state.register_layer(layer, hidden.shape[1], attn.scale)
        bias = None if attention_mask is None else _key_bias(layer, attention_mask[self._rows], keys.shape[-2])
        state.add_cross_attention(layer, queries, keys, flat_queries, attn.scale, self._layer_context_keys(layer, attn, hidden), bias)

    def _layer_context_keys(self, layer, attn, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """phrase -> W_k X' [heads, m, d] for this layer, computed on its first call only (X' never changes)."""
        if layer.name not in self._context_keys:
            self._context_keys[layer.name] = {
                phrase: _normed(attn, "norm_k", split_heads(attn.to_k(ctx.embeddings.to(like)[None]), attn.heads))[0]
                for phrase, ctx in self.contexts.items()
            }
        return self._context_keys[layer.name]

    def observe_joint_attention(self, layer, attn, hidden_states, encoder_hidden_states, rotary=None) -> None:
        """SD3 and Flux's double-stream blocks: ``hidden_states`` [B, hw, C] image stream, ``encoder_hidden_states``
        [B, n, C] this block's text stream; Flux's single-stream blocks: [text, image] joined and no text stream."""
        state = self._require_state(layer)
        _check_token_sequence(layer, hidden_states)
        if self._rows is None:  # Flux: a call of the branch not traced
            return
        text = None if encoder_hidden_states is None else encoder_hidden_states[self._rows]  # [N, n, C]
        hidden = hidden_states[self._rows]  # [N, hw, C] (Flux's single-stream blocks: [N, n + hw, C])
        queries, image_keys, text_keys, scale = self.reader.joint_attention(attn, hidden, text, rotary)
        state.register_layer(layer, queries.shape[2], scale)
        if self.options.daam or self.options.linear:
            state.add_joint_attention(layer, queries, image_keys, text_keys, scale)
        concept_maps = None if self.concepts is None else self.concepts.observe(layer.name, attn, hidden, text, rotary,
                                                                                (queries, image_keys, text_keys))
        if concept_maps is not None:
            state.add_concept_maps(layer, *concept_maps)
        if layer.name in self._joint_self and state.at_last_step:
            state.set_self_attention(layer, _joint_outputs(attn, hidden, text, queries, torch.cat([image_keys, text_keys], 2), scale))

    def observe_self_attention(self, layer, attn, hidden_states, attention_mask) -> None:
        state = self._require_state(layer)
        if not state.at_last_step:  # the up blocks' self-attention of the last step only
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
            raise RuntimeError(f"{layer.name} ran outside a UNet call; trace only wraps pipeline or UNet calls")
        return self._current


class BatchedReader:
    """How a trace reads the calls of a UNet (SD 1.x/2.x/XL), PixArt or SD3: one call per step, classifier-free guidance
    batched as [uncond x N, cond x N] (diffusers' layout; without it all N rows are conditional); and SD3's joint
    attention. :class:`daamlib.capture.flux.FluxReader` reads Flux's calls."""

    def __init__(self, pipe, options: TraceOptions, unet_calls: int | None) -> None:
        self.pipe, self.options, self.unet_calls = pipe, options, unet_calls

    def read(self, inputs: dict, fresh: bool, complete: bool, encoder_calls: dict[str, list]):
        """(latent size (h, w) when the call starts a generation, else None; images N; the traced branch's rows;
        timestep). ``fresh``: a generation must start; ``complete``: the current one ran all its steps."""
        sample = inputs["sample"] if "sample" in inputs else inputs["hidden_states"]  # [B, C, h, w] latents
        batch, cfg = sample.shape[0], self._uses_cfg()
        if cfg and batch % 2:
            raise ValueError(f"classifier-free guidance with an odd batch of {batch}; pass cfg=False to trace")
        if self.options.branch == "uncond" and not cfg:
            raise ValueError("branch='uncond' needs classifier-free guidance (guidance_scale > 1)")
        num_images = batch // 2 if cfg else batch
        rows = slice(num_images, 2 * num_images) if cfg and self.options.branch == "cond" else slice(0, num_images)
        latent_size = tuple(sample.shape[-2:]) if fresh or complete else None
        return latent_size, num_images, rows, torch.as_tensor(inputs["timestep"]).detach().reshape(-1)[0]

    def _uses_cfg(self) -> bool:
        # direct UNet calls (unet_calls set, cfg given): the pipeline's flag is stale or missing, so it is not read
        pipeline_cfg = None if self.unet_calls is not None else getattr(self.pipe, "do_classifier_free_guidance", None)
        cfg = self.options.cfg
        if cfg is None and pipeline_cfg is None:
            raise ValueError(f"{type(self.pipe).__name__} does not say whether it uses classifier-free guidance; "
                             "pass cfg=True or cfg=False to trace")
        if cfg is not None and pipeline_cfg is not None and bool(pipeline_cfg) != cfg:
            uses = "uses" if pipeline_cfg else "does not use"
            raise ValueError(f"trace(cfg={cfg}) but this pipeline call {uses} classifier-free guidance "
                             f"(guidance_scale={getattr(self.pipe, 'guidance_scale', '?')}); leave cfg=None so the "
                             "pipeline's own batch layout is traced, or change guidance_scale")
        return bool(pipeline_cfg) if cfg is None else cfg

    @staticmethod
    def joint_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, rotary=None):
        """SD3's (image queries, image keys, text keys) [N, heads, positions, d] and the softmax scale."""
        queries = _normed(attn, "norm_q", split_heads(attn.to_q(hidden_states), attn.heads))  # [N, heads, hw, d]
        image_keys = _normed(attn, "norm_k", split_heads(attn.to_k(hidden_states), attn.heads))  # [N, heads, hw, d]
        text_keys = _normed(attn, "norm_added_k", split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads))
        return queries, image_keys, text_keys, attn.scale  # text keys [N, heads, n, d]


def _joint_outputs(attn, hidden: torch.Tensor, text: torch.Tensor | None, queries: torch.Tensor, keys: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The image tokens' attention outputs [N, heads, hw, d] as the block computes them before its output projection:
    softmax over ``keys`` [image, text] (normed and rotated as the block does) of the values [v_image, v_text]; values
    are projected only (SD3 and Flux's double-stream blocks: ``add_v_proj`` for text; single-stream: [text, image] joined)."""
    if text is None:  # Flux's single-stream block: its n text positions come first
        n = keys.shape[2] - queries.shape[2]
        text_values, hidden = attn.to_v(hidden[:, :n]), hidden[:, n:]
    else:
        text_values = attn.add_v_proj(text)
    values = torch.cat([split_heads(attn.to_v(hidden), attn.heads), split_heads(text_values, attn.heads)], dim=2)
    return torch.nn.functional.scaled_dot_product_attention(queries, keys, values, scale=scale)


def _check_token_sequence(layer: AttentionLayer, hidden_states: torch.Tensor) -> None:
    if hidden_states.ndim != 3:
        raise ValueError(f"{layer.name} got hidden states of shape {tuple(hidden_states.shape)}; "
                         "only transformer-block attention ([batch, positions, channels]) can be traced")


def _key_bias(layer: AttentionLayer, mask: torch.Tensor, num_keys: int) -> torch.Tensor:
    """The additive mask a model applies over its keys (PixArt's T5 padding: 0 or -10000), as [N, 1, 1, n]."""
    if mask.ndim != 3 or mask.shape[1] != 1 or mask.shape[-1] != num_keys or mask.dtype == torch.bool:
        raise ValueError(f"{layer.name} received an attention mask of shape {tuple(mask.shape)} and dtype {mask.dtype}; "
                         f"only an additive key mask [batch, 1, {num_keys}] (as PixArt's) can be traced")
    return mask[:, :, None, :].float()


def _normed(attn, norm_name: str, tensor: torch.Tensor) -> torch.Tensor:
    norm = getattr(attn, norm_name, None)
    return norm(tensor) if norm is not None else tensor


def _encode_contexts(pipe, phrases: Iterable[str] | Mapping[str, torch.Tensor], include_padding: bool) -> dict[str, ContextKeys]:
    """Each phrase's keys (SOT, its words, EOT; and its padding when asked), encoded alone; or named conditioning
    vectors [m, d_text] such as optimized tokens. On the execution device: uploaded once here, not at every call."""
    from ..text import TextEncoder

    device, contexts = execution_device(pipe), {}
    if isinstance(phrases, Mapping):
        d_text = attention_layers(denoiser(pipe), "cross")[0].key_dim
        for name, vectors in phrases.items():
            vectors = torch.as_tensor(vectors).detach().float().to(device)
            if vectors.ndim != 2 or vectors.shape[-1] != d_text:
                raise ValueError(f"context {name!r} must be vectors [m, {d_text}] (the model's conditioning size); "
                                 f"got shape {tuple(vectors.shape)}")
            contexts[name] = ContextKeys(embeddings=vectors, token_strings=[f"{name}[{i}]" for i in range(len(vectors))])
        return contexts
    for phrase in phrases:
        encoded = TextEncoder(pipe).encode(phrase)
        positions = encoded.key_positions(include_padding)
        contexts[phrase] = ContextKeys(embeddings=encoded.embeddings[positions].detach().to(device),
                                       token_strings=[encoded.tokens.strings[i] for i in positions])
    return contexts


@contextmanager
def trace(pipe, options: TraceOptions | None = None, *, unet_calls: int | None = None, **fields) -> Iterator[Trace]:
    """Capture attention during every pipeline call inside the ``with`` block.

    What is recorded is a :class:`TraceOptions`, passed whole or as its fields
    (``trace(pipe, per_head=True, queries=True)``); see its docstring for each field.
    ``unet_calls``: for code that calls the denoiser itself (as :func:`daamlib.attribute_image`): how many
    UNet calls make one record. The pipeline's per-call ``_num_timesteps`` and ``do_classifier_free_guidance``
    (stale or missing outside its ``__call__``) are then not read, so ``cfg`` must be given too.
    """
    if options is not None and fields:
        raise TypeError("pass either options= or option fields, not both (use dataclasses.replace(options, ...))")
    known = {field.name for field in dataclasses.fields(TraceOptions)}
    if set(fields) - known:
        raise TypeError(f"unknown trace options {sorted(set(fields) - known)}; choose from {sorted(known)}")
    options = options if options is not None else TraceOptions(**fields)
    if unet_calls is not None and (type(unet_calls) is not int or unet_calls < 1 or options.cfg is None):
        raise ValueError(f"unet_calls={unet_calls!r} (direct UNet calls) needs a positive count and cfg=True or cfg=False "
                         "(whether the batch is [uncond, cond]); the pipeline says so only inside its own call")
    unet = denoiser(pipe)
    available = attention_layers(unet, "text")
    if not available:
        raise NotImplementedError(f"{type(unet).__name__} has no cross- or joint-attention layers daamlib can read; "
                                  "daamlib traces SD 1.x/2.x/XL UNets, PixArt-α/Σ, SD3 and Flux")
    cross_layers = select_layers(available, options.layers)
    if any(layer.kind == "joint" for layer in cross_layers) and (options.queries or options.contexts):
        raise ValueError("queries= and contexts= need one conditioning space that every layer's keys read; in the joint "
                         "attention of SD3 and Flux each block projects its own text stream, so a word outside the prompt "
                         "has no key there: trace with concepts=[...] (ConceptAttention) for words not in the prompt; "
                         "daam, per_head, per_step and linear (the prompt's words) apply")
    if options.query_layers is not None:
        select_layers(cross_layers, options.query_layers)  # validates the names
    self_layers = [l for l in attention_layers(unet, "self") if l.block == "up_blocks"] if options.self_attention else []
    if options.self_attention and not self_layers and not any(layer.kind == "joint" for layer in cross_layers):
        raise ValueError(f"self_attention=True records the up blocks' self-attention of a UNet, or the image tokens' "
                         f"attention outputs of SD3's and Flux's later joint blocks; {type(unet).__name__} has neither")
    traced = cross_layers + self_layers
    context_keys = _encode_contexts(pipe, options.contexts, options.context_padding) if options.contexts else {}
    concepts = concept_stream(pipe, options)  # refuses what has no MM-DiT text stream
    tr = Trace(pipe, options, traced, context_keys, model_fingerprint(pipe), unet_calls, concepts)

    originals = unet.attn_processors
    processors = dict(originals)
    for layer in traced:
        key = f"{layer.name}.processor"
        processors[key] = CaptureProcessor(layer, originals[key], tr)
    handles = [unet.register_forward_pre_hook(tr.on_denoiser, with_kwargs=True)]
    for encoder, _ in token_streams(pipe):
        handles.append(getattr(pipe, encoder).register_forward_pre_hook(partial(tr.on_text_encoder, encoder), with_kwargs=True))
    unet.set_attn_processor(processors)
    try:
        yield tr
        tr._finish_current()
        tr._build_records()  # the generation is over: reading its tensors stalls nothing
    except BaseException:
        tr._abandon_unfinished()  # a failed generation leaves no partial record; finished ones are kept
        raise
    finally:
        unet.set_attn_processor(dict(originals))  # the setter consumes the dict it is given
        tr.reader = None  # Flux's holds the prompt embeddings and latents of the last generation
        for handle in handles:
            handle.remove()
