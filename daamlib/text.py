"""Text conditioning from a pipeline's own text encoder(s), with token positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .modules import conditioning, execution_device
from .tokens import PromptTokens


@dataclass(frozen=True)
class EncodedText:
    """A phrase as the denoiser's cross-attention sees it: tokens and their contextual embeddings in the
    space the keys are projected from (:func:`daamlib.modules.conditioning`)."""

    tokens: PromptTokens
    embeddings: torch.Tensor  # [n, d_text], float32 on the CPU

    def key_positions(self, include_padding: bool = False) -> list[int]:
        """Positions used as keys: SOT, the words and EOT; plus the padding when asked."""
        last = self.tokens.length if include_padding else self.tokens.eot_index + 1
        return list(range(last))


class TextEncoder:
    """Encodes phrases with ``pipe.encode_prompt`` (SD 1.x/2.x, SDXL and PixArt alike)."""

    def __init__(self, pipe) -> None:
        if getattr(pipe, "tokenizer", None) is None or getattr(pipe, "text_encoder", None) is None:
            raise ValueError("the pipeline has no tokenizer or text encoder; words need both to become embeddings")
        self.pipe = pipe

    @torch.no_grad()
    def encode(self, text: str) -> EncodedText:
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the text to encode is empty; pass a word or a phrase")
        encoded_ids: list[torch.Tensor] = []  # the ids the text encoder really saw (after textual-inversion
        # expansion and the pipeline's own cleaning, e.g. PixArt's lower-casing), one [1, n] per encoder call
        handle = self.pipe.text_encoder.register_forward_pre_hook(
            lambda module, args, kwargs: encoded_ids.append(args[0] if args else kwargs["input_ids"]), with_kwargs=True)
        try:
            embeddings = self.pipe.encode_prompt(
                prompt=text,
                device=execution_device(self.pipe),
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )[0]  # [1, n, d_encoder]; n is the pipeline's own length (77 for CLIP, max_sequence_length for T5)
        finally:
            handle.remove()
        tokens = PromptTokens.from_ids(encoded_ids[0][0].tolist(), self.pipe.tokenizer)
        return EncodedText(tokens, conditioning(self.pipe, embeddings)[0].detach().to("cpu", torch.float32))

    def word_vector(self, word: str) -> torch.Tensor:
        """The embedding of ``word`` encoded alone (SOT word EOT), averaged over its tokens. [d_text]"""
        encoded = self.encode(word)
        indices = encoded.tokens.token_indices(word)
        return encoded.embeddings[list(indices)].mean(dim=0)
