"""One protocol for every heatmap method, the way notebooks, widgets, evaluation and optimization use them.

A method is an object built once with what it needs (the pipeline, tokens, layers, steps) and one
verb, ``attribute(record, word)``, which returns an :class:`Attribution`: the map and the key tokens
it averages. The functions ``daam``, ``openvocab`` and ``linear`` stay as the shortcuts.

    methods = {"DAAM": DAAM(), "Linear DAAM": LinearDAAM(pipe), "tree in context": OpenVocabulary(pipe, "a {word} on a street")}
    for name, method in methods.items():
        found = method.attribute(record, "car")     # found.heatmap [H, W], found.tokens ("car</w>",)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import torch

from ..metrics import normalize
from ..record import Record
from .daam import daam
from .linear import linear, linear_maps
from .openvocab import openvocab, openvocab_maps


@dataclass(frozen=True)
class Attribution:
    """A heatmap and what it attributes."""

    heatmap: torch.Tensor  # [H, W] at latent resolution, float32 on the CPU
    tokens: tuple[str, ...]  # the key tokens whose maps it averages (e.g. ("traffic</w>", "light</w>"))
    method: str


class HeatmapMethod(Protocol):
    name: str

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution: ...


def vector_maps(record: Record, vectors: torch.Tensor, variant: str, pipe=None) -> torch.Tensor:
    """Heatmaps of conditioning vectors [k, d_text] -> [k, H, W]: ``"linear"`` is M x (linear matrix),
    ``"softmax"`` a softmax over the k vectors' keys (query cache; ``pipe`` for W_k). Differentiable."""
    if variant == "linear":
        return linear_maps(record, vectors)
    if variant == "softmax":
        return openvocab_maps(record, vectors, pipe)
    raise ValueError(f"variant must be 'linear' or 'softmax', not {variant!r}")


def _prompt_tokens(record: Record, word: str | int, occurrence: int, stream: str | None = None) -> tuple[str, ...]:
    try:
        tokens = record.tokens
        return tuple(tokens.strings[i] for i in tokens.token_indices(word, occurrence, stream))
    except (KeyError, IndexError):  # prompt embeddings (no token strings) or a word the prompt does not hold
        return (str(word),)


@dataclass(frozen=True)
class DAAM:
    """Softmax cross-attention of the prompt's word (thesis eq. 3.1-3.4, or ``mode="daam-0.2"``)."""

    mode: str = "thesis"
    layers: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    upsample: str | None = None
    stream: str | None = None  # SD3's text stream to read ("clip", "t5"; None: see daam)
    name: str = "DAAM"

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution:
        heatmap = daam(record, word, occurrence=occurrence, stream=self.stream, mode=self.mode, layers=self.layers,
                       steps=self.steps, upsample=self.upsample)
        return Attribution(heatmap, _prompt_tokens(record, word, occurrence, self.stream), self.name)


@dataclass(frozen=True)
class OpenVocabulary:
    """Softmax maps of a word inside a context phrase X' (eq. 3.5-3.6): ``context`` is a template whose
    ``{word}`` is the word, or the name of a phrase the record stored by re-run; ``token`` picks one
    key of a stored phrase by index instead of the word (e.g. 0 for an optimized object token)."""

    pipe: Any = None
    context: str = "{word}"
    layers: Sequence[str] | None = None
    steps: Sequence[int] | None = None
    include_padding: bool = False
    upsample: str = "bilinear"
    token: int | None = None
    name: str = "open-vocabulary"

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution:
        phrase = self.context.format(word=word) if "{word}" in self.context else self.context
        key = word if self.token is None else self.token
        heatmap = openvocab(record, phrase, key, pipe=self.pipe, occurrence=occurrence, layers=self.layers,
                            steps=self.steps, include_padding=self.include_padding, upsample=self.upsample)
        return Attribution(heatmap, (phrase if self.token is None else f"{phrase}[{self.token}]",), self.name)


def _min_max_linear(heatmap: torch.Tensor, variant: str, min_max: bool) -> torch.Tensor:
    """A linear map M x is signed (no softmax keeps it positive; one can be negative everywhere), so it is
    min-max scaled to [0, 1] as the thesis scales linear maps (§3.4): D >= τ·max D then keeps the top
    (1 - τ) of the map's range. Softmax maps are returned as they are."""
    return normalize(heatmap) if variant == "linear" and min_max else heatmap


@dataclass(frozen=True)
class LinearDAAM:
    """The no-softmax map of the word's conditioning vector (eq. 3.7-3.8), min-max scaled to [0, 1]
    (``min_max=False``: M x itself, as ``daamlib.linear`` returns it); ``pipe`` encodes words not in the prompt."""

    pipe: Any = None
    min_max: bool = True
    stream: str | None = None  # SD3's text stream to read, as for DAAM
    name: str = "Linear DAAM"

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution:
        heatmap = linear(record, word, pipe=self.pipe, occurrence=occurrence, stream=self.stream)
        return Attribution(_min_max_linear(heatmap, "linear", self.min_max), _prompt_tokens(record, word, occurrence, self.stream),
                           self.name)


@dataclass(frozen=True)
class OptimizedToken:
    """The object token of optimized vectors (eq. 3.9-3.11), chosen by the word they were initialised from.

    ``tokens`` maps words to :class:`~daamlib.optimize.OptimizedTokens`; linear tokens read the record's
    linear matrix (min-max scaled, as they were trained; ``min_max=False``: M x), softmax tokens its query
    cache (``pipe`` needed for W_k)."""

    tokens: Mapping[str, Any]
    pipe: Any = None
    min_max: bool = True
    name: str = "optimized"

    def attribute(self, record: Record, word: str | int, occurrence: int = 0) -> Attribution:
        if word not in self.tokens:
            raise KeyError(f"no optimized tokens for {word!r}; optimized words: {sorted(self.tokens)}")
        found = self.tokens[word]
        maps = vector_maps(record, found.vectors, found.variant, self.pipe)  # [k, H, W]
        heatmap = _min_max_linear(maps[0].detach().cpu(), found.variant, self.min_max)
        return Attribution(heatmap, (found.names[0],), self.name)

    @classmethod
    def by_init_word(cls, tokens: Sequence[Any] | Mapping[Any, Any], pipe=None, name: str = "optimized",
                     min_max: bool = True) -> "OptimizedToken":
        """Key tokens by the word each was initialised from (their ``init``)."""
        found = list(tokens.values()) if isinstance(tokens, Mapping) else list(tokens)
        missing = [t for t in found if t.init is None]
        if missing:
            raise ValueError("tokens initialised from a vector have no word; build OptimizedToken({word: tokens}) yourself")
        return cls({t.init: t for t in found}, pipe, min_max, name)
