"""Running sums for one pipeline call (one or more images), turned into records at the end."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from functools import partial

import torch

from ..layout import resize, unflatten_positions
from ..modules import linear_parameters
from ..record import RECORD_KINDS, LayerMeta, Record, RecordMeta, map_tensors
from ..tokens import PromptTokens
from .layers import AttentionLayer, layer_resolution
from .options import TraceOptions


@dataclass
class ContextKeys:
    """A phrase attached as non-influencing keys: its embeddings and key token names."""

    embeddings: torch.Tensor  # [m, d_text]
    token_strings: list[str]


@dataclass
class GenerationState:
    """Sums for the ``num_images`` images of one pipeline call, batched along dim 0.

    Tensors stay on the device the UNet computes on; nothing is read back until ``to_records``.
    """

    options: TraceOptions
    num_images: int
    latent_size: tuple[int, int]
    token_streams: list[tuple[torch.Tensor, object]]  # ([prompts, n_i] ids of the traced branch, tokenizer) in the
    # order the denoiser reads them (SD3: CLIP then T5); empty when the prompt came as embeddings
    expected_steps: int | None  # UNet calls of this generation, as the pipeline announced them
    text_embeddings: torch.Tensor | None = None  # [num_images, n, d_text], from the traced branch's first call
    timesteps: list[torch.Tensor] = field(default_factory=list)  # 0-d, one per UNet call
    layers: dict[str, LayerMeta] = field(default_factory=dict)
    daam: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, hw, n]
    daam_heads: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, heads, hw, n]
    daam_steps: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # steps x [N, hw, n]
    query_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, hw, inner]
    linear_logits: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, hw, n] joint attention's q k^T
    queries: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [N, hw, inner]
    contexts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # [N, hw, m]
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, heads, hw, d]
    concept_output: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, hw, k] ConceptAttention (see .concepts)
    concept_cross: dict[str, torch.Tensor] = field(default_factory=dict)  # [N, hw, k] its cross-attention variant

    @property
    def step(self) -> int:
        return len(self.timesteps) - 1

    @property
    def complete(self) -> bool:
        """Whether every announced denoising step ran."""
        return self.expected_steps is not None and len(self.timesteps) >= self.expected_steps

    @property
    def at_last_step(self) -> bool:
        return self.expected_steps is not None and self.step == self.expected_steps - 1

    def register_layer(self, layer: AttentionLayer, num_positions: int, scale: float) -> None:
        if layer.name not in self.layers:
            self.layers[layer.name] = LayerMeta(
                name=layer.name,
                kind=layer.kind,
                heads=layer.heads,
                head_dim=layer.head_dim,
                resolution=layer_resolution(num_positions, self.latent_size),
                scale=float(scale),
            )

    # -- accumulation (called by the trace for the traced rows) -------------------------------
    def add_cross_attention(
        self,
        layer: AttentionLayer,
        queries: torch.Tensor,  # [N, heads, hw, head_dim]
        keys: torch.Tensor,  # [N, heads, n, head_dim]
        flat_queries: torch.Tensor,  # [N, hw, inner]
        scale: float,
        context_keys: dict[str, torch.Tensor],  # phrase -> [heads, m, head_dim]
        key_bias: torch.Tensor | None = None,  # [N, 1, 1, n] additive mask the model applies (PixArt's padding)
    ) -> None:
        options, name = self.options, layer.name
        queries32 = queries.float()
        if options.daam:
            logits = queries32 @ keys.float().transpose(-1, -2) * scale  # [N, heads, hw, n]
            self._add_maps(name, torch.softmax(logits if key_bias is None else logits + key_bias, dim=-1))
        if options.linear:
            _add(self.query_sums, name, flat_queries.float())
        if options.wants_queries(name, self.step):
            self.queries[(name, self.step)] = _cached(flat_queries, options)
        for phrase, phrase_keys in context_keys.items():
            logits = queries32 @ phrase_keys.float().transpose(-1, -2).unsqueeze(0) * scale
            _add(self.contexts.setdefault(phrase, {}), name, torch.softmax(logits, dim=-1).sum(dim=1))  # [N, hw, m]

    def add_joint_attention(
        self,
        layer: AttentionLayer,
        queries: torch.Tensor,  # [N, heads, hw, head_dim] image queries
        image_keys: torch.Tensor,  # [N, heads, hw, head_dim]
        text_keys: torch.Tensor,  # [N, heads, n, head_dim]
        scale: float,
    ) -> None:
        """The text columns of the softmax over [image keys, text keys] that SD3's and Flux's joint attention
        computes (``daam``), and their logits before the softmax, unscaled and summed over heads (``linear``)."""
        queries32 = queries.float()
        products = queries32 @ text_keys.float().transpose(-1, -2)  # [N, heads, hw, n]
        if self.options.linear:
            _add(self.linear_logits, layer.name, products.sum(dim=1))
        if not self.options.daam:
            return
        text_logits = products * scale
        image_normalizer = torch.cat([  # log-sum-exp over the image keys, one head at a time ([hw, hw] each)
            torch.logsumexp(queries32[:, h : h + 1] @ image_keys[:, h : h + 1].float().transpose(-1, -2) * scale, dim=-1)
            for h in range(queries.shape[1])], dim=1)  # [N, heads, hw]
        normalizer = torch.logaddexp(image_normalizer, torch.logsumexp(text_logits, dim=-1))
        self._add_maps(layer.name, torch.exp(text_logits - normalizer[..., None]))

    def add_concept_maps(self, layer: AttentionLayer, output: torch.Tensor, cross: torch.Tensor) -> None:
        """One call's concept maps [N, hw, k] of one block (softmaxes over the concepts)."""
        _add(self.concept_output, layer.name, output)
        _add(self.concept_cross, layer.name, cross)

    def _add_maps(self, name: str, probs: torch.Tensor) -> None:
        """Accumulate one call's attention to the text keys [N, heads, hw, n] as the options ask."""
        head_sum = probs.sum(dim=1)  # [N, hw, n]
        _add(self.daam, name, head_sum)
        if self.options.per_head:
            _add(self.daam_heads, name, probs)
        if self.options.per_step:
            self.daam_steps.setdefault(name, []).append(head_sum)

    def set_self_attention(self, layer: AttentionLayer, head_outputs: torch.Tensor) -> None:
        self.self_attention[layer.name] = head_outputs.float()  # [N, heads, hw, head_dim]

    # -- records ------------------------------------------------------------------------------
    def to_records(self, denoiser: torch.nn.Module, contexts: dict[str, ContextKeys], provenance: dict) -> list[Record]:
        """Split the batched sums into one :class:`Record` per image (``denoiser``: the traced layers' W_k;
        ``provenance``: the records' model_id, model_fingerprint, scheduler and image_size).

        Maps go to the CPU in float32; the query cache stays where it was recorded.
        """
        if self.text_embeddings is None:
            raise ValueError(f"no denoiser call of the traced branch ({self.options.branch!r}) ran in this generation; "
                             "Flux calls the negative prompt's only with true CFG (negative_prompt=, true_cfg_scale > 1)")
        if self.text_embeddings.is_cuda:
            torch.cuda.synchronize(self.text_embeddings.device)  # non-blocking copies into pinned host memory have landed
        batched = {kind.name: getattr(self, kind.name, None) for kind in RECORD_KINDS}  # entries [N, ...] (steps: lists)
        batched["linear_matrix"], batched["linear_bias"] = self._collapse_linear(denoiser)
        tokens = self._image_tokens()
        timesteps = [float(t) for t in self.timesteps]
        records = []
        for index in range(self.num_images):
            meta = RecordMeta(
                token_ids=list(tokens[index].ids) if tokens else None,
                token_strings=list(tokens[index].strings) if tokens else None,
                added_tokens=list(tokens[index].added_tokens) if tokens else [],
                token_streams=[list(stream) for stream in tokens[index].streams] if tokens else [],
                latent_size=tuple(self.latent_size),
                layers=list(self.layers.values()),
                timesteps=timesteps,
                branch=self.options.branch,
                linear_upsample=self.options.upsample,
                image_index=index,
                query_steps=sorted({step for _, step in self.queries}),
                contexts={phrase: keys.token_strings for phrase, keys in contexts.items()},
                concepts=list(self.options.concepts or ()),
                **provenance,
            )
            per_image = {kind.name: map_tensors(kind, batched[kind.name], partial(_image_entry, kind.name, index))
                         for kind in RECORD_KINDS}
            records.append(Record(meta=meta, **per_image))
        return records

    def _image_tokens(self) -> list[PromptTokens] | None:
        """The traced branch's prompt tokens per image (diffusers repeats each prompt consecutively).

        Streams are joined in order; positions no stream covers (SD3 without its T5 encoder feeds zeros
        there) are named ``<pad>``."""
        if not self.token_streams:
            return None
        num_tokens = self.text_embeddings.shape[1]
        streams = [[PromptTokens.from_ids(ids, tokenizer) for ids in stream_ids.cpu().tolist()]
                   for stream_ids, tokenizer in self.token_streams]
        prompts = []
        for per_stream in zip(*streams):
            ids = [i for tokens in per_stream for i in tokens.ids]
            strings = [s for tokens in per_stream for s in tokens.strings]
            added = [a for tokens in per_stream for a in tokens.added_tokens]
            missing = num_tokens - len(ids)
            starts = [sum(tokens.length for tokens in per_stream[:i]) for i in range(len(per_stream))]
            names = tuple(("clip" if tokens.sot_index is not None else "t5", start) for tokens, start in zip(per_stream, starts))
            prompts.append(PromptTokens(tuple(ids + [0] * missing), tuple(strings + ["<pad>"] * missing), tuple(added), names))
        for tokens in streams[0]:
            if tokens.maybe_truncated:
                warnings.warn(
                    f"the prompt fills all {tokens.length} text-encoder tokens and may have been "
                    f"truncated; it was seen as {tokens.text!r}",
                    stacklevel=3,
                )
        per_prompt = self.num_images // len(prompts)  # diffusers repeats each prompt consecutively (checked at the start)
        return [prompts[i // per_prompt] for i in range(self.num_images)]

    def _collapse_linear(self, denoiser: torch.nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """M = sum_l up((sum_t Q_t,l) W_k^l)  [N, H*W, d_text], and the same for the key bias; computed where the sums are."""
        if not self.query_sums:
            return None, None
        total, biased = 0, False
        for name, query_sum in self.query_sums.items():
            to_k = denoiser.get_submodule(name).to_k  # its weight and bias are brought here, also from CPU offload
            weight, key_bias = linear_parameters(to_k, query_sum.device)  # [inner, d_text], [inner]
            biased = biased or key_bias is not None
            bias_column = torch.zeros_like(weight[:, :1]) if key_bias is None else key_bias[:, None]  # the bias, an input
            layer_matrix = unflatten_positions(query_sum @ torch.cat([weight, bias_column], dim=1),  # [N, d_text + 1, h_l, w_l]
                                               self.layers[name].resolution)
            up = resize(layer_matrix, self.latent_size, self.options.upsample)
            total = total + up.flatten(-2).transpose(-1, -2)  # [N, H*W, d_text + 1]
        return total[..., :-1], total[..., -1] if biased else None


def _add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in store:
        store[name] += value
    else:
        store[name] = value.clone()


def _cached(flat_queries: torch.Tensor, options: TraceOptions) -> torch.Tensor:
    """A query-cache entry [N, hw, inner]: kept on the UNet's device, or copied into pinned host memory
    without waiting (the copy lands before ``to_records`` reads it)."""
    if options.query_device is None or not flat_queries.is_cuda:
        return flat_queries.to(dtype=options.query_dtype)
    host = torch.empty(flat_queries.shape, dtype=options.query_dtype, pin_memory=True)
    host.copy_(flat_queries.to(dtype=options.query_dtype), non_blocking=True)
    return host


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float32).contiguous()


def _image_entry(kind: str, index: int, batched) -> torch.Tensor:
    """One image's entry of a batched sum, on the CPU in float32 (the query cache stays where it was recorded)."""
    if kind == "queries":
        return batched[index]
    return _cpu(torch.stack([step[index] for step in batched]) if kind == "daam_steps" else batched[index])
