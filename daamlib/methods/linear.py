"""Linear (no-softmax) open-vocabulary DAAM (thesis eq. 3.7-3.8) through the collapsed matrix.

L(x) = sum_{t,l,h} up(Q_{t,l,h} . (W_k^l x)_h) is linear in x, so a trace stores
M = sum_l up((sum_t Q_{t,l}) W_k^l)  [H*W, d_text] and every heatmap is the mat-vec M x.

In the joint attention of SD3 and Flux each block reads its own text stream, which changes from step to step:
there is no one x and no matrix M. The trace stores, per block, the logits q k^T of the prompt's text keys
before the softmax, unscaled and summed over steps and heads (``record.linear_logits``), and the linear map of
a word of the prompt is the same sum, L = sum_{t,l,h} up(Q_{t,l,h} . K_{t,l,h}[word]). Words outside the
prompt and conditioning vectors have no key there (ConceptAttention, ``trace(concepts=...)``, stands in).
"""

from __future__ import annotations

import torch

from ..modules import check_same_model
from ..record import Record
from ..text import TextEncoder
from ..tokens import WordNotInPrompt
from .common import chosen_layers, sum_upsampled, word_indices

_NO_JOINT_KEY = ("in the joint attention of SD3 and Flux every block reads its own text stream, so {what} has no key "
                 "there; linear maps exist for the prompt's words, and ConceptAttention (trace(concepts=[...])) maps "
                 "words the prompt does not hold")


def linear(record: Record, word_or_vector: str | int | torch.Tensor, *, pipe=None, occurrence: int = 0,
           stream: str | None = None) -> torch.Tensor:
    """The linear DAAM heatmap of a word, token index or conditioning vector.  [H, W]

    A word of the generating prompt uses its contextual embedding from that prompt (averaged over
    its tokens); any other word is encoded alone by ``pipe``'s text encoder. On SD3 and Flux (joint attention) only
    words and token indices of the prompt have maps: the mean over the word's tokens (in ``stream``, as for
    ``daam``) of the summed logits.
    """
    if record.linear_matrix is None and record.linear_logits:
        return _joint_linear(record, word_or_vector, occurrence, stream)
    if stream is not None:
        raise ValueError(f"stream={stream!r} chooses among the text streams of SD3 and Flux; this record has one (drop it)")
    return linear_maps(record, word_vector(record, word_or_vector, pipe=pipe, occurrence=occurrence)[None])[0].detach().cpu()


def linear_maps(record: Record, vectors: torch.Tensor) -> torch.Tensor:
    """Heatmaps of conditioning vectors [k, d_text] -> [k, H, W], on the matrix's device. Differentiable in ``vectors``."""
    if record.linear_matrix is None:
        if record.linear_logits:
            raise ValueError(_NO_JOINT_KEY.format(what="a conditioning vector"))
        raise KeyError("the record has no linear matrix; trace with linear=True")
    matrix = record.linear_matrix.float()
    if vectors.ndim != 2 or vectors.shape[-1] != matrix.shape[-1]:
        raise ValueError(f"vectors must be [k, {matrix.shape[-1]}] (the model's conditioning size); got {tuple(vectors.shape)}")
    maps = vectors.to(matrix.device, matrix.dtype) @ matrix.T  # [k, H*W]
    if record.linear_bias is not None:
        maps = maps + record.linear_bias.to(matrix.device, torch.float32)
    return maps.reshape(-1, *record.latent_size)


def word_vector(record: Record, word_or_vector: str | int | torch.Tensor, *, pipe=None, occurrence: int = 0) -> torch.Tensor:
    """The conditioning vector [d_text] that stands for a word, token index or vector."""
    if isinstance(word_or_vector, torch.Tensor):
        vector = word_or_vector.detach() if not word_or_vector.requires_grad else word_or_vector
        if vector.ndim == 2 and vector.shape[0] == 1:
            vector = vector[0]
        if vector.ndim != 1:
            raise ValueError(f"a conditioning vector is [d_text] (or [1, d_text]), not {tuple(word_or_vector.shape)}; "
                             "for several vectors use linear_maps(record, vectors)")
        if not bool(torch.isfinite(vector).all()):
            raise ValueError("the conditioning vector holds NaN or inf values")
        return vector.float()
    try:
        indices = word_indices(record, word_or_vector, occurrence)
    except WordNotInPrompt:
        if pipe is None:
            raise KeyError(
                f"{word_or_vector!r} is not in the prompt; pass pipe= so its embedding can be computed "
                "with the model's text encoder"
            ) from None
    else:
        return record.text_embeddings[indices].float().mean(dim=0)
    check_same_model(record.meta.model_fingerprint, pipe)
    return TextEncoder(pipe).word_vector(word_or_vector)


def _joint_linear(record: Record, word: str | int, occurrence: int, stream: str | None) -> torch.Tensor:
    """sum over blocks of up(linear_logits[block][:, word's tokens]), averaged over the tokens.  [H, W]"""
    if isinstance(word, torch.Tensor):
        raise ValueError(_NO_JOINT_KEY.format(what="a conditioning vector"))
    try:
        indices = word_indices(record, word, occurrence, stream)
    except WordNotInPrompt:
        raise KeyError(f"{word!r} is not in the prompt; " + _NO_JOINT_KEY.format(what="a word outside the prompt")) from None
    layers = chosen_layers(record, None, record.linear_logits)
    per_layer = {layer.name: record.linear_logits[layer.name][:, indices] for layer in layers}  # [hw, k]
    return sum_upsampled(per_layer, layers, record.latent_size, record.meta.linear_upsample).mean(dim=0)
