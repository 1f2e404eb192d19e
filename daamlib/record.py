"""What a trace captured for one generated image, and its safetensors + JSON file format.

All maps are stored at each layer's native resolution and flattened row-major, the way the
UNet's attention sees them (``hw = h_l * w_l`` positions); the methods upsample once per layer.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .io import save_safetensors
from .tokens import PromptTokens

FORMAT_NAME = "daamlib.record"
FORMAT_VERSION = 2  # 2 added model_fingerprint
_READABLE_VERSIONS = (1, 2)
_METADATA_KEY = "daamlib"


def library_version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class LayerMeta:
    """A traced attention layer as it ran for this image."""

    name: str
    kind: str  # "cross" or "self"
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
    added_tokens: list[str] = field(default_factory=list)  # textual-inversion tokens of the prompt
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


@dataclass
class Record:
    """The capture of one generated image.

    Maps live on the CPU in float32; the query cache stays where the trace recorded it (the
    pipeline's device unless ``query_device="cpu"``). ``to(device)`` moves every tensor.

    Shapes (hw = h_l * w_l of the layer, n = text tokens, d = d_text, H x W = latent):
      daam[layer]            [hw, n]          softmax attention summed over steps and heads
      daam_heads[layer]      [heads, hw, n]   summed over steps only
      daam_steps[layer]      [steps, hw, n]   summed over heads only
      queries[(layer, step)] [hw, heads*head_dim]  W_q h for open-vocabulary maps
      linear_matrix          [H*W, d]         M = sum_l up((sum_t Q_t,l) W_k^l)
      linear_bias            [H*W]            the same for the key bias (zero in SD)
      text_embeddings        [n, d]           the conditioning X of the traced branch
      contexts[phrase][layer] [hw, m]         re-run open-vocabulary sums over the phrase's m keys
      self_attention[layer]  [heads, hw, head_dim]  last-step per-head self-attention output
      image                  [height, width, 3] uint8, when the generator stored it
    """

    meta: RecordMeta
    daam: dict[str, torch.Tensor] = field(default_factory=dict)
    daam_heads: dict[str, torch.Tensor] = field(default_factory=dict)
    daam_steps: dict[str, torch.Tensor] = field(default_factory=dict)
    queries: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    linear_matrix: torch.Tensor | None = None
    linear_bias: torch.Tensor | None = None
    text_embeddings: torch.Tensor | None = None
    contexts: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    self_attention: dict[str, torch.Tensor] = field(default_factory=dict)
    image: np.ndarray | None = None

    # -- convenience ------------------------------------------------------------------------
    @property
    def tokens(self) -> PromptTokens:
        if self.meta.token_ids is None:
            raise KeyError(
                "this record has no prompt tokens (the pipeline was called with prompt_embeds); "
                "address tokens by index instead of by word"
            )
        return PromptTokens(tuple(self.meta.token_ids), tuple(self.meta.token_strings), tuple(self.meta.added_tokens))

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
        return [layer for layer in self.meta.layers if layer.kind == "cross"]

    @property
    def num_steps(self) -> int:
        return len(self.meta.timesteps)

    def to(self, device: str | torch.device) -> "Record":
        """A copy with every tensor on ``device`` (e.g. the query cache uploaded once before optimizing)."""
        def move(store: dict) -> dict:
            return {key: value.to(device) for key, value in store.items()}

        def maybe(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device)

        return replace(
            self, daam=move(self.daam), daam_heads=move(self.daam_heads), daam_steps=move(self.daam_steps),
            queries=move(self.queries), linear_matrix=maybe(self.linear_matrix), linear_bias=maybe(self.linear_bias),
            text_embeddings=maybe(self.text_embeddings), contexts={p: move(m) for p, m in self.contexts.items()},
            self_attention=move(self.self_attention),
        )

    # -- persistence --------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write the record atomically as one ``.safetensors`` file with its JSON metadata.

        ``dtype`` (e.g. ``torch.float16``) converts floating tensors to save space.
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype such as torch.float16 (or None to keep float32), not {dtype!r}")
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        tensors = {name: _stored(t, dtype) for name, t in self._named_tensors().items()}
        if self.image is not None:
            tensors["image"] = torch.from_numpy(np.ascontiguousarray(self.image))
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, path, {_METADATA_KEY: self.meta.to_json()})
        return path

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        named: dict[str, torch.Tensor] = {}
        named.update({f"daam/{k}": v for k, v in self.daam.items()})
        named.update({f"daam_heads/{k}": v for k, v in self.daam_heads.items()})
        named.update({f"daam_steps/{k}": v for k, v in self.daam_steps.items()})
        named.update({f"queries/{layer}/{step}": v for (layer, step), v in self.queries.items()})
        named.update({f"self_attention/{k}": v for k, v in self.self_attention.items()})
        for index, (phrase, maps) in enumerate(self.contexts.items()):
            named.update({f"contexts/{index}/{layer}": v for layer, v in maps.items()})
        if self.linear_matrix is not None:
            named["linear_matrix"] = self.linear_matrix
        if self.linear_bias is not None:
            named["linear_bias"] = self.linear_bias
        if self.text_embeddings is not None:
            named["text_embeddings"] = self.text_embeddings
        return named


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().cpu().contiguous()
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def _check_kind(path: Path, metadata: dict) -> None:
    """A readable safetensors file of another kind is named as such (not called corrupt)."""
    text = metadata.get(_METADATA_KEY)
    found = json.loads(text).get("format") if text else None
    if found == FORMAT_NAME:
        return
    if found == "daamlib.tokens":
        raise _WrongKind(f"{path} holds optimized tokens, not a record; read it with daamlib.OptimizedTokens.load")
    raise _WrongKind(f"{path} is a safetensors file but not a daamlib record (no daamlib record metadata); "
                     "records are written by Record.save")


class _WrongKind(Exception):
    pass


def load_record(path: str | os.PathLike) -> Record:
    """Read a record written by :meth:`Record.save`; a damaged file raises a ``ValueError``."""
    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".safetensors").exists():
        path = path.with_name(path.name + ".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no record at {path}")
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass the record's .safetensors file")
    try:
        with safe_open(path, framework="pt") as handle:
            _check_kind(path, handle.metadata() or {})
            meta = RecordMeta.from_json((handle.metadata() or {})[_METADATA_KEY])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except _WrongKind as error:
        raise ValueError(str(error)) from None
    except (SafetensorError, KeyError, ValueError, json.JSONDecodeError, TypeError, OSError) as error:
        raise ValueError(
            f"{path} is not a readable daamlib record ({error}); it may be truncated or corrupt - "
            "regenerate it with the same seed"
        ) from error
    record = Record(meta=meta)
    context_names = list(meta.contexts)
    for name, tensor in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "daam":
            record.daam[rest] = tensor
        elif kind == "daam_heads":
            record.daam_heads[rest] = tensor
        elif kind == "daam_steps":
            record.daam_steps[rest] = tensor
        elif kind == "queries":
            layer, _, step = rest.rpartition("/")
            record.queries[(layer, int(step))] = tensor
        elif kind == "self_attention":
            record.self_attention[rest] = tensor
        elif kind == "contexts":
            index, _, layer = rest.partition("/")
            record.contexts.setdefault(context_names[int(index)], {})[layer] = tensor
        elif kind == "image":
            record.image = tensor.numpy()
        elif kind == "linear_matrix":  # queried by a mat-vec per word: convert once, not on every query
            record.linear_matrix = tensor.float()
        else:
            setattr(record, kind, tensor)
    return record
