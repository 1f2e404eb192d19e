"""Token-embedding optimization (thesis eq. 3.9-3.11, §4.4).

Gradient descent on vectors in the conditioning space so that their heatmaps match target
masks. Variants:
  * ``"linear"``: one vector x, heatmap L(x) = M x from the collapsed linear matrix;
  * ``"softmax"``: two vectors [object, background], softmax open-vocabulary maps over just
    those two keys from the query cache (needs ``pipe`` for W_k).
Heatmaps are min-max normalised before the loss. Masks are given at image resolution and
area-averaged to the latent grid once, so every epoch works at latent resolution.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .io import read_safetensors, save_safetensors
from .methods.linear import word_vector
from .methods.protocol import vector_maps
from .modules import check_same_model, execution_device, same_model
from .record import Record, library_version

Variant = Literal["linear", "softmax"]
Loss = Literal["ce", "bce", "softmax_ce"]
_EPSILON = 1e-6
_FORMAT_NAME = "daamlib.tokens"


@dataclass
class OptimizedTokens:
    """Optimized conditioning vectors with what is needed to use them again."""

    vectors: torch.Tensor  # [k, d_text]; k = 1 (linear) or 2 (softmax: object, background)
    variant: Variant
    loss: Loss
    names: list[str]
    model_id: str | None
    history: list[float] = field(default_factory=list)  # loss per epoch
    model_fingerprint: dict | None = None  # of the model whose records trained them (daamlib.modules)
    init: str | None = None
    library_version: str = field(default_factory=library_version)

    @property
    def object_vector(self) -> torch.Tensor:
        return self.vectors[0]

    def save(self, path: str | os.PathLike) -> Path:
        meta = {k: v for k, v in self.__dict__.items() if k != "vectors"}
        return save_safetensors({"vectors": self.vectors.detach().cpu().contiguous()}, path,
                                {"daamlib": json.dumps({"format": _FORMAT_NAME, **meta})})

    @classmethod
    def load(cls, path: str | os.PathLike, expected_model_id: str | None = None, *, pipe=None) -> "OptimizedTokens":
        """Read tokens written by :meth:`save`; ``pipe=`` checks they were optimized for its weights."""
        path, metadata, tensors = read_safetensors(path, "optimized tokens", "optimize them again")
        try:
            meta = json.loads(metadata.get("daamlib", "{}"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not a readable optimized-tokens file ({error}); optimize them again") from error
        vectors = tensors.get("vectors")
        found = meta.pop("format", None)
        if found != _FORMAT_NAME or vectors is None:
            hint = "; it is a daamlib record: read it with daamlib.load_record" if found == "daamlib.record" else ""
            raise ValueError(f"{path} does not hold daamlib optimized tokens{hint}")
        if expected_model_id is not None and meta["model_id"] != expected_model_id:
            raise ValueError(f"tokens in {path} were optimized for {meta['model_id']!r}, not {expected_model_id!r}; "
                             "conditioning vectors do not transfer between models")
        tokens = cls(vectors=vectors, **meta)
        if pipe is not None:
            check_same_model(tokens.model_fingerprint, pipe, f"the tokens in {path}")
        return tokens


def optimize_tokens(records: Sequence[Record], masks: Sequence[np.ndarray | torch.Tensor], *, init: str | torch.Tensor,
                    variant: Variant = "linear", loss: Loss | None = None, epochs: int = 500, learning_rate: float = 3.0,
                    background_init: str | torch.Tensor | None = None, pipe=None, progress: bool = True) -> OptimizedTokens:
    """Optimize a token (linear) or an object + background token pair (softmax) on ``records``.

    Args:
        records: training records (``linear=True`` for "linear", ``queries=True`` for "softmax").
        masks: one boolean target mask per record, at the record's image resolution.
        init: the class word (its contextual embedding initialises x) or a vector [d_text].
        loss: "ce" (thesis eq. 3.10; for the softmax pair eq. 3.11, the sum over both tokens; the default), "bce",
            or "softmax_ce" (softmax variant only: cross-entropy of each pixel's share between the two tokens).
        learning_rate: Adam's step size (the thesis used 3 for 500 epochs).
        background_init: the background token's start for the softmax variant (default: :func:`default_background`).
    """
    if not records:
        raise ValueError("optimize_tokens needs at least one training record")
    if len(records) != len(masks):
        raise ValueError(f"{len(records)} records but {len(masks)} masks; pass one mask per record")
    if variant not in ("linear", "softmax"):
        raise ValueError(f"variant must be 'linear' or 'softmax', not {variant!r}")
    loss = loss or "ce"
    if loss not in ("ce", "bce", "softmax_ce"):
        raise ValueError(f"loss must be 'ce', 'bce' or 'softmax_ce', not {loss!r}")
    if loss == "softmax_ce" and variant != "softmax":
        raise ValueError("loss='softmax_ce' compares two token maps; use it with variant='softmax'")
    if variant == "softmax" and pipe is None:
        raise ValueError("variant='softmax' needs pipe= for the key projections W_k")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, not {epochs!r}")
    if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number, not {learning_rate!r}")
    _check_records(records, variant, pipe)

    targets = [latent_target(record, mask, index) for index, (record, mask) in enumerate(zip(records, masks))]
    starts = [word_vector(records[0], init, pipe=pipe)]
    names = [init if isinstance(init, str) else "object"]
    if variant == "softmax":
        background = default_background(records[0]) if background_init is None else background_init
        starts.append(word_vector(records[0], background, pipe=pipe))
        names.append("background")
    device = execution_device(pipe) if pipe is not None else torch.device("cpu")
    records = [record.to(device) for record in records]  # uploaded once, not per epoch
    targets = [target.to(device) for target in targets]
    vectors = torch.stack(starts).detach().to(device).clone().requires_grad_(True)  # [k, d_text]
    optimizer = torch.optim.Adam([vectors], lr=learning_rate)
    losses = []
    for _ in tqdm(range(epochs), desc="optimizing tokens", disable=not progress):
        optimizer.zero_grad()
        total = sum(
            token_loss(vector_maps(record, vectors, variant, pipe), target, loss)
            for record, target in zip(records, targets)
        ) / len(records)
        total.backward()
        optimizer.step()
        losses.append(total.detach())  # read once at the end: no host sync per epoch
    return OptimizedTokens(vectors=vectors.detach().cpu(), variant=variant, loss=loss, names=names,
                           model_id=records[0].meta.model_id, history=torch.stack(losses).cpu().tolist(),
                           init=init if isinstance(init, str) else None, model_fingerprint=records[0].meta.model_fingerprint)


def _check_records(records: Sequence[Record], variant: Variant, pipe) -> None:
    """All records of one model (the pipeline's, when given) and holding what the variant reads."""
    needed = "linear_matrix" if variant == "linear" else "queries"
    for index, record in enumerate(records):
        if record.linear_logits and record.linear_matrix is None:
            raise ValueError(f"record {index} comes from joint attention (SD3, Flux), where every block reads its own "
                             "text stream: there is no conditioning space a token could be optimized in, so token "
                             "optimization applies to SD 1.x/2.x/XL and PixArt only")
        if variant == "linear" and record.linear_matrix is None or variant == "softmax" and not record.queries:
            option = "linear=True" if variant == "linear" else "queries=True"
            raise ValueError(f"record {index} has no {needed}; variant={variant!r} needs records traced with {option}")
    first = records[0].meta
    for index, record in enumerate(records[1:], start=1):
        meta = record.meta
        same = (same_model(first.model_fingerprint, meta.model_fingerprint)
                if first.model_fingerprint or meta.model_fingerprint else first.model_id == meta.model_id)
        if not same:
            raise ValueError(f"record {index} comes from another model than record 0 ({meta.model_id!r} vs {first.model_id!r}); "
                             "tokens are optimized for one model: pass records of a single model")
    if pipe is not None:
        check_same_model(first.model_fingerprint, pipe, "record 0")


def token_loss(maps: torch.Tensor, target: torch.Tensor, loss: Loss) -> torch.Tensor:
    """The loss between heatmaps [k, H, W] and the object target [H, W] (k = 1 or 2).

    "ce" and "bce" score each token's min-max scaled map against its own mask and sum over tokens (eq. 3.11):
    the object token against the object, the background token (k = 2) against its complement."""
    targets = torch.stack([target, 1 - target])  # object, background
    if loss == "softmax_ce":
        per_token = maps / maps.sum(dim=0, keepdim=True).clamp_min(_EPSILON)  # share of each token per pixel
        return -(targets * per_token.clamp_min(_EPSILON).log()).sum(dim=0).mean()
    total = maps.new_zeros(())
    for heatmap, token_target in zip(maps, targets):
        heatmap = soft_normalize(heatmap)
        if loss == "ce":  # eq. 3.10, per target pixel
            total = total - (token_target * heatmap.clamp_min(_EPSILON).log()).sum() / token_target.sum().clamp_min(_EPSILON)
        else:
            total = total + F.binary_cross_entropy(heatmap.clamp(_EPSILON, 1 - _EPSILON), token_target)
    return total


def default_background(record: Record) -> str:
    """The softmax variant's background start: SOT, as in the thesis, where the tokenizer has one (CLIP); the end
    token for SentencePiece tokenizers (T5: PixArt), which have no start token."""
    return "<sot>" if record.tokens.sot_index is not None else "<eot>"


def soft_normalize(heatmap: torch.Tensor) -> torch.Tensor:
    """Min-max scaling that stays finite (and differentiable) for constant maps."""
    low = heatmap.min()
    return (heatmap - low) / (heatmap.max() - low + _EPSILON)


def latent_target(record: Record, mask: np.ndarray | torch.Tensor, index: int = 0) -> torch.Tensor:
    """A boolean image-resolution mask area-averaged to the latent grid.  [H, W] float in [0, 1]"""
    mask = torch.as_tensor(np.asarray(mask))
    expected = record.image_size
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"mask {index} is {tuple(mask.shape)} but the record's image is {tuple(expected)}; "
                         "pass one [height, width] mask per record at image resolution")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask {index} is not binary (values other than 0 and 1); threshold it first, e.g. mask > 0.5")
    mask = mask.float()
    if not bool(mask.any()):
        raise ValueError(f"mask {index} is empty: the object is nowhere in it, so there is nothing to optimize towards")
    return F.adaptive_avg_pool2d(mask[None, None], record.latent_size)[0, 0]
