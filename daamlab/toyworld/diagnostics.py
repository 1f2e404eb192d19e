"""Why the toy model's cross-attention does (not) localize: the word-embedding diagnostic.

* :func:`embedding_cosines`: the contextual embeddings of the class and background words in
  "a {word} in an urban environment" and their keys after a mid-block and a highest-resolution
  ``to_k``, summarised as the mean off-diagonal cosine. Near 1 means every word gets the same
  key, so the softmax over tokens is flat and no word can win a region.

* :func:`token_group_shares`: where the image's attention to text goes, summed over pixels, steps, layers and
  heads: SOT, the prompt's words, EOT and the padding after it. In a causal text encoder EOT and the padding have
  read the whole caption, so a UNet that puts its mass there gets the caption without any word's position.

The quick check of a model (DAAM, fidelity, open-vocabulary mass) is ``python -m daamlab.toyworld_quickcheck``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from daamlab.toyworld import labels as L

TEMPLATE = "a {word} in an urban environment"
# The phrase each word is placed in, and the word whose last token is measured.
CLASS_PHRASES = {"car": "car", "person": "person", "light": "traffic light", "rider": "rider"}
BACKGROUND_WORDS = tuple(L.BACKGROUND_WORDS.values())
# Background word -> the annotator label it should fall on.
BACKGROUND_LABELS = {word: label for label, word in L.BACKGROUND_WORDS.items()}


def diagnostic_words() -> dict[str, str]:
    """Measured word -> the phrase put in the template (class words, then background words)."""
    return {**CLASS_PHRASES, **{word: word for word in BACKGROUND_WORDS}}


@torch.no_grad()
def word_embeddings(text_encoder, tokenizer, words: dict[str, str], template: str = TEMPLATE) -> torch.Tensor:
    """Contextual embedding of each word's last token in ``template``.  [W, d_text]"""
    vectors = []
    for word, phrase in words.items():
        prompt = template.format(word=phrase)
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        position = _last_position(ids, word_ids)
        hidden = text_encoder(torch.tensor([ids], device=text_encoder.device)).last_hidden_state[0]  # [77, d]
        vectors.append(hidden[position].float().cpu())
    return torch.stack(vectors)


def _last_position(ids: list[int], word_ids: list[int]) -> int:
    """Index of the last token of the first occurrence of ``word_ids`` in ``ids``."""
    for start in range(len(ids) - len(word_ids) + 1):
        if ids[start : start + len(word_ids)] == word_ids:
            return start + len(word_ids) - 1
    raise ValueError(f"tokens {word_ids} not in {ids}")


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine of vectors [W, d].  [W, W]"""
    unit = torch.nn.functional.normalize(vectors.float(), dim=-1)
    return unit @ unit.T


def mean_offdiagonal(matrix: torch.Tensor) -> float:
    count = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (count * (count - 1)))


def key_projections(unet) -> dict[str, torch.nn.Linear]:
    """The cross-attention ``to_k`` of the mid block and of the highest-resolution down block."""
    return {"mid to_k": unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k,
            "highest-res to_k": unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k}


@torch.no_grad()
def embedding_cosines(text_encoder, tokenizer, unet=None) -> dict[str, object]:
    """Mean off-diagonal cosine of the words' embeddings (and of their keys when ``unet`` is given),
    and the embeddings' full cosine matrix as a DataFrame."""
    words = diagnostic_words()
    vectors = word_embeddings(text_encoder, tokenizer, words)  # [W, d_text]
    matrix = cosine_matrix(vectors)
    result: dict[str, object] = {"embedding": mean_offdiagonal(matrix),
                                 "class words": mean_offdiagonal(matrix[:4, :4])}
    if unet is not None:
        for name, projection in key_projections(unet).items():
            keys = projection(vectors.to(projection.weight.device, projection.weight.dtype))  # [W, inner]
            result[name] = mean_offdiagonal(cosine_matrix(keys))
    result["matrix"] = pd.DataFrame(matrix.numpy(), index=list(words), columns=list(words))
    return result


def pipeline_cosines(pipe) -> dict[str, object]:
    return embedding_cosines(pipe.text_encoder, pipe.tokenizer, pipe.unet)


def format_cosines(result: dict[str, object]) -> str:
    parts = [f"{name} {value:.3f}" for name, value in result.items() if name != "matrix"]
    return "mean off-diagonal cosine: " + ", ".join(parts)


def token_group_shares(record) -> dict[str, float]:
    """Shares of a record's attention mass to text on SOT, the words, EOT and padding (they sum to 1)."""
    mass = sum(record.daam[layer.name].float().sum(dim=0) for layer in record.cross_layers)  # [n tokens]
    tokens = record.tokens
    groups = {"SOT": [tokens.sot_index], "words": [i for word in tokens.words for i in word.token_indices],
              "EOT": [tokens.eot_index], "padding": list(tokens.padding_indices)}
    return {name: float(mass[indices].sum() / mass.sum()) for name, indices in groups.items()}
