"""What a trace captured for one generated image, and its safetensors + JSON file format.

All maps are stored at each layer's native resolution and flattened row-major, the way the
UNet's attention sees them (``hw = h_l * w_l`` positions); the methods upsample once per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal
from pathlib import Path

import numpy as np
import torch

from .io import read_safetensors, save_safetensors
from .tokens import PromptTokens

FORMAT_NAME = "daamlib.record"
FORMAT_VERSION = 4  # 2 added model_fingerprint, 3 concepts (ConceptAttention), 4 token_streams
_READABLE_VERSIONS = (1, 2, 3, 4)
_METADATA_KEY = "daamlib"


def library_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class LayerMeta:
    """A traced attention layer as it ran for this image."""

    name: str
    kind: str  # "cross", "joint" (SD3: the text columns of its [image, text] softmax) or "self"
    heads: int
    head_dim: int
    resolution: tuple[int, int]  # (h_l, w_l)
    scale: float  # the softmax scale the layer used (1/sqrt(head_dim) in SD)


@dataclass
class RecordMeta:
    """Everything needed to reproduce and interpret a record."""

    token_ids: list[int] | None
    token_strings: list[str] | None
    latent_size: tuple[int, int]
    image_size: tuple[int, int] | None
    layers: list[LayerMeta]
    timesteps: list[float]
    branch: str
    linear_upsample: str
    model_id: str | None = None
    model_fingerprint: dict | None = None  # daamlib.modules.model_fingerprint of the generating pipeline
    scheduler: str | None = None
    seed: int | None = None
    prompt: str | None = None
    image_index: int = 0
    query_steps: list[int] = field(default_factory=list)
    contexts: dict[str, list[str]] = field(default_factory=dict)  # phrase -> its key token strings
    concepts: list[str] = field(default_factory=list)  # ConceptAttention's concepts, the k columns of concept maps
    added_tokens: list[str] = field(default_factory=list)  # textual-inversion tokens of the prompt
    token_streams: list[list] = field(default_factory=list)  # [name, first position] per text encoder (SD3: clip, t5)
    library_version: str = field(default_factory=library_version)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "RecordMeta":
        data = json.loads(text)
        if data.pop("format", None) != FORMAT_NAME:
            raise ValueError("not a daamlib record")
        version = data.pop("version")
        if version not in _READABLE_VERSIONS:
            raise ValueError(f"record format version {version} is not supported (this daamlib reads {_READABLE_VERSIONS}); "
                             "upgrade daamlib or regenerate the record")
        data["layers"] = [
            LayerMeta(**{**layer, "resolution": tuple(layer["resolution"])}) for layer in data["layers"]
        ]
        data["latent_size"] = tuple(data["latent_size"])
        if data["image_size"] is not None:
            data["image_size"] = tuple(data["image_size"])
        return cls(**data)


# -- what a record can hold: declared once ---------------------------------------------------------
Keying = Literal["layer", "layer_step", "phrase_layer", "single"]


@dataclass(frozen=True)
class RecordKind:
    """One kind of tensor a record holds: its field, how it is keyed, its shape, how it is stored."""

    name: str  # the Record field, and the prefix of its tensors in the file
    keying: Keying  # {layer: t}, {(layer, step): t}, {phrase: {layer: t}} or one tensor
    shape: str  # per entry (hw = h_l * w_l of the layer, n = text tokens, d = d_text, H x W = latent)
    meaning: str
    float32_on_load: bool = False  # converted once when loaded (read on every query)


RECORD_KINDS = (
    RecordKind("daam", "layer", "[hw, n]", "softmax attention summed over steps and heads"),
    RecordKind("daam_heads", "layer", "[heads, hw, n]", "summed over steps only"),
    RecordKind("daam_steps", "layer", "[steps, hw, n]", "summed over heads only"),
    RecordKind("queries", "layer_step", "[hw, heads*head_dim]", "W_q h for open-vocabulary maps"),
    RecordKind("linear_matrix", "single", "[H*W, d]", "M = sum_l up((sum_t Q_t,l) W_k^l)", float32_on_load=True),
    RecordKind("linear_bias", "single", "[H*W]", "the same for the key bias (zero in SD)"),
    RecordKind("linear_logits", "layer", "[hw, n]", "joint attention (SD3, Flux): q k^T of the text keys, no softmax, "
               "summed over steps and heads"),
    RecordKind("text_embeddings", "single", "[n, d]", "the conditioning X of the traced branch"),
    RecordKind("contexts", "phrase_layer", "[hw, m]", "re-run open-vocabulary sums over the phrase's m keys"),
    RecordKind("self_attention", "layer", "[heads, hw, head_dim]", "last-step per-head self-attention output"),
    RecordKind("concept_output", "layer", "[hw, k]", "ConceptAttention: softmax over concepts of o_x o_c, summed over steps"),
    RecordKind("concept_cross", "layer", "[hw, k]", "softmax over concepts of q_x k_c, summed over heads and steps"),
)
_KINDS_BY_NAME = {kind.name: kind for kind in RECORD_KINDS}


def map_tensors(kind: RecordKind, value, function):
    """Apply ``function`` to every tensor of one kind's value, keeping its keying."""
    if kind.keying == "single":
        return None if value is None else function(value)
    if kind.keying == "phrase_layer":
        return {phrase: {layer: function(t) for layer, t in maps.items()} for phrase, maps in value.items()}
    return {key: function(t) for key, t in value.items()}


def _file_entries(kind: RecordKind, value, phrases: list[str]) -> dict[str, torch.Tensor]:
    """A kind's tensors under their file names: ``kind``, ``kind/layer``, ``kind/layer/step``, ``kind/<phrase index>/layer``."""
    if kind.keying == "single":
        return {} if value is None else {kind.name: value}
    if kind.keying == "layer":
        return {f"{kind.name}/{layer}": t for layer, t in value.items()}
    if kind.keying == "layer_step":
        return {f"{kind.name}/{layer}/{step}": t for (layer, step), t in value.items()}
    return {f"{kind.name}/{phrases.index(phrase)}/{layer}": t for phrase, maps in value.items() for layer, t in maps.items()}


def _place_entry(record: "Record", name: str, tensor: torch.Tensor) -> None:
    """Put one file entry back where ``_file_entries`` took it from."""
    prefix, _, rest = name.partition("/")
    kind = _KINDS_BY_NAME.get(prefix)
    if kind is None:
        raise ValueError(f"the file holds a tensor {name!r} of a kind this daamlib does not know "
                         f"({sorted(_KINDS_BY_NAME)}); it may come from a newer daamlib: upgrade to read it")
    tensor = tensor.float() if kind.float32_on_load else tensor
    store = getattr(record, kind.name)
    if kind.keying == "single":
        setattr(record, kind.name, tensor)
    elif kind.keying == "layer":
        store[rest] = tensor
    elif kind.keying == "layer_step":
        layer, _, step = rest.rpartition("/")
        store[(layer, int(step))] = tensor
    else:
        index, _, layer = rest.partition("/")
        store.setdefault(list(record.meta.contexts)[int(index)], {})[layer] = tensor


@dataclass
class Record:
    """The capture of one generated image.

    Maps live on the CPU in float32; the query cache stays where the trace recorded it (the
    pipeline's device unless ``query_device="cpu"``). ``to(device)`` moves every tensor.

    What it holds is declared once in ``RECORD_KINDS`` (field, keying, shape, meaning); the fields
    below follow it, and so do ``save``, ``load_record`` and ``to``. Shapes per entry:
      daam[layer] [hw, n]; daam_heads[layer] [heads, hw, n]; daam_steps[layer] [steps, hw, n];
      queries[(layer, step)] [hw, inner]; linear_matrix [H*W, d]; linear_bias [H*W]; linear_logits[layer] [hw, n];
      text_embeddings [n, d]; contexts[phrase][layer] [hw, m]; self_attention[layer] [heads, hw, head_dim];
      concept_output[layer], concept_cross[layer] [hw, k] (k = len(meta.concepts));
      image [height, width, 3] uint8, when the generator stored it.
    """

    meta: RecordMeta
    daam: dict[str, torch.Tensor] = field(default_factory=dict)
    daam_heads: dict[str, torch.Tensor] = field(default_factory=dict)
    daam_steps: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    linear_matrix: torch.Tensor | None = None
    linear_bias: torch.Tensor | None = None
    linear_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    text_embeddings: torch.Tensor | None = None
    contexts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)
    concept_output: dict[str, torch.Tensor] = field(default_factory=dict)
    concept_cross: dict[str, torch.Tensor] = field(default_factory=dict)
    image: np.ndarray | None = None

    # -- convenience ------------------------------------------------------------------------
    @property
    def tokens(self) -> PromptTokens:
        if self.meta.token_ids is None:
            raise KeyError("this record has no prompt tokens (the pipeline was called with prompt_embeds); "
                           "address tokens by index instead of by word")
        return PromptTokens(tuple(self.meta.token_ids), tuple(self.meta.token_strings), tuple(self.meta.added_tokens),
                            tuple((name, int(start)) for name, start in self.meta.token_streams))

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.meta.latent_size

    @property
    def image_size(self) -> tuple[int, int]:
        if self.meta.image_size is not None:
            return self.meta.image_size
        if self.image is not None:
            return tuple(self.image.shape[:2])
        raise KeyError("this record does not know its image size; pass size= explicitly")

    def layer(self, name: str) -> LayerMeta:
        for layer in self.meta.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"layer {name!r} was not traced; traced: {[l.name for l in self.meta.layers]}")

    @property
    def cross_layers(self) -> list[LayerMeta]:
        """Layers whose maps hold image-query attention to the text tokens (cross or joint attention)."""
        return [layer for layer in self.meta.layers if layer.kind in ("cross", "joint")]

    @property
    def num_steps(self) -> int:
        return len(self.meta.timesteps)

    def to(self, device: str | torch.device) -> "Record":
        """A copy with every tensor on ``device`` (e.g. the query cache uploaded once before optimizing)."""
        moved = {kind.name: map_tensors(kind, getattr(self, kind.name), lambda t: t.to(device)) for kind in RECORD_KINDS}
        return replace(self, **moved)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the record atomically as one ``.safetensors`` file with its JSON metadata.

        ``dtype`` (e.g. ``torch.float16``) converts floating tensors to save space.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float16 (or None to keep float32), not {dtype!r}")
        phrases = list(self.meta.contexts)
        tensors = {name: _stored(t, dtype) for kind in RECORD_KINDS
                   for name, t in _file_entries(kind, getattr(self, kind.name), phrases).items()}
        if self.image is not None:
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(self.image))
        return save_safetensors(tensors, path, {_METADATA_KEY: self.meta.to_json()})


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def load_record(path: str | os.PathLike) -> Record:
    """Read a record written by :meth:`Record.save`; a damaged file raises a ``ValueError``."""
    fix = "it may be truncated or corrupt - regenerate it with the same seed"
    path, metadata, tensors = read_safetensors(path, "daamlib record", fix)
    try:
        found = json.loads(metadata.get(_METADATA_KEY) or "{}").get("format")
        meta = RecordMeta.from_json(metadata[_METADATA_KEY]) if found == FORMAT_NAME else None
    except (KeyError, ValueError, TypeError) as error:  # ValueError: also a JSONDecodeError
        raise ValueError(f"{path} is not a readable daamlib record ({error}); {fix}") from error
    if found == "daamlib.tokens":  # a readable safetensors file of another kind is named as such (not called corrupt)
        raise ValueError(f"{path} holds optimized tokens, not a record; read it with daamlib.OptimizedTokens.load")
    if meta is None:
        raise ValueError(f"{path} is a safetensors file but not a daamlib record (no daamlib record metadata); "
                         "records are written by Record.save")
    record = Record(meta=meta)
    for name, tensor in tensors.items():
        if name == "image":
            record.image = tensor.numpy()
        else:
            _place_entry(record, name, tensor)
    return record
