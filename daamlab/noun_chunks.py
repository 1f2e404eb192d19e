"""Noun chunks as concepts (StableSemantics): caption → spaCy noun chunks → one heatmap per chunk,
dataset-level concept statistics, and scoring any segmenter against the attention maps.

spaCy needs an English pipeline with a parser, installed once with
``python -m spacy download en_core_web_sm`` (or a wheel from spaCy's releases); nothing is
downloaded by daamlib itself.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import torch

from daamlib.methods import daam, resize
from daamlib.metrics import iou, normalize, pearson, to_mask_resolution
from daamlib.record import Record

DEFAULT_SPACY_MODEL = "en_core_web_sm"


def load_spacy(name: str = DEFAULT_SPACY_MODEL):
    import spacy

    try:
        return spacy.load(name)
    except OSError as error:
        raise OSError(f"spaCy pipeline {name!r} is not installed; install it once with "
                      f"`python -m spacy download {name}` (or pip install its wheel)") from error


_DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some"}


def noun_chunks(caption: str, nlp: Callable) -> list[str]:
    """The caption's noun chunks, lower-cased, leading determiners dropped ("a red car" → "red car")."""
    chunks = []
    for chunk in nlp(caption).noun_chunks:
        words = [token.text.lower() for token in chunk if not (token.i == chunk.start and token.lower_ in _DETERMINERS)]
        if words:
            chunks.append(" ".join(words))
    return chunks


def chunk_maps(record: Record, nlp: Callable) -> dict[str, torch.Tensor]:
    """One DAAM heatmap [H, W] per noun chunk of the record's prompt (the chunk's tokens averaged)."""
    if record.meta.prompt is None:
        raise ValueError("the record has no prompt text; create it with daamlib.generate")
    return {chunk: daam(record, chunk) for chunk in noun_chunks(record.meta.prompt, nlp)}


def concept_statistics(maps: Iterable[tuple[str, torch.Tensor]], size: tuple[int, int]) -> dict[str, np.ndarray]:
    """Mean normalised spatial map per concept over a dataset ("spatial distribution of concepts").  {concept: [h, w]}"""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)
    for concept, heatmap in maps:
        scaled = normalize(resize(heatmap.float(), size, "bilinear")).numpy()
        sums[concept] = sums.get(concept, 0) + scaled
        counts[concept] += 1
    return {concept: sums[concept] / counts[concept] for concept in sums}


def score_segmenter(predictions: Mapping[str, np.ndarray], attention: Mapping[str, torch.Tensor], tau: float = 0.4) -> pd.DataFrame:
    """Score a segmenter's per-concept masks [H, W] against attention maps: IoU with D >= τ·max D, and Pearson."""
    rows = {}
    for concept, mask in predictions.items():
        if concept not in attention:
            raise KeyError(f"no attention map for concept {concept!r}; have {sorted(attention)}")
        mask = np.asarray(mask, dtype=bool)
        heatmap = normalize(to_mask_resolution(attention[concept], mask.shape)).numpy()
        rows[concept] = {"iou": iou(heatmap >= tau, mask), "pearson": pearson(heatmap, mask.astype(float))}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.loc["mean"] = table.mean()
    return table
