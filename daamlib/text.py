"""Text conditioning from a pipeline's own text encoder(s), with token positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modules import execution_device
from .tokens import PromptTokens


@dataclass(frozen=True)
class EncodedText:
    """A phrase as the UNet would see it: tokens and their contextual embeddings."""

    tokens: PromptTokens
    embeddings: torch.Tensor  # [n, d_text], float32 on the CPU

    def key_positions(self, include_padding: bool = False) -> list[int]:
        """Positions used as keys: SOT, the words and EOT; plus the padding when asked."""
        last = self.tokens.length if include_padding else self.tokens.eot_index + 1
        return list(range(last))


class TextEncoder:
    """Encodes phrases with ``pipe.encode_prompt`` (SD 1.x/2.x and SDXL alike)."""

    def __init__(self, pipe) -> None:
        if getattr(pipe, "tokenizer", None) is None:
            raise ValueError("the pipeline has no tokenizer; words need one to become embeddings")
        self.pipe = pipe

    @torch.no_grad()
    def encode(self, text: str) -> EncodedText:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text to encode is empty; pass a word or a phrase")
        # textual-inversion pipelines expand a multi-vector token "<tok>" to "<tok> <tok>_1 ..." before encoding
        converted = self.pipe.maybe_convert_prompt(text, self.pipe.tokenizer) if hasattr(self.pipe, "maybe_convert_prompt") else text
        tokens = PromptTokens.from_text(converted, self.pipe.tokenizer)
        embeddings = self.pipe.encode_prompt(
            prompt=text,
            device=execution_device(self.pipe),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )[0]  # [1, n, d_text]
        return EncodedText(tokens, embeddings[0].detach().to("cpu", torch.float32))

    def word_vector(self, word: str) -> torch.Tensor:
        """The embedding of ``word`` encoded alone (SOT word EOT), averaged over its tokens. [d_text]"""
        encoded = self.encode(word)
        indices = encoded.tokens.token_indices(word)
        return encoded.embeddings[list(indices)].mean(dim=0)
