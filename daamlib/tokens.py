"""Prompt <-> token <-> word mapping for CLIP's BPE and T5's SentencePiece.

A prompt is tokenized by the pipeline into a fixed number of ids (77 for CLIP, the pipeline's
``max_sequence_length`` for T5). CLIP: ``<|startoftext|>`` (SOT), the word pieces,
``<|endoftext|>`` (EOT), then padding; its BPE marks the last piece of every word with ``</w>``.
T5 (PixArt, SD3's third encoder, Flux): no SOT; the pieces, ``</s>`` (EOT), then ``<pad>``;
SentencePiece marks the first piece of every word with ``▁``. Either way words are recovered from
the token strings alone: a record can find its words without the tokenizer that made it. Tokens added to the tokenizer (textual-inversion embeddings loaded with
``pipe.load_textual_inversion``) are whole words; a multi-vector embedding ``<tok>`` expands to
``<tok> <tok>_1 <tok>_2 ...`` and is one word, ``<tok>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

SOT = "<sot>"
EOT = "<eot>"
_SOT_ALIASES = {SOT, "<|startoftext|>"}
_EOT_ALIASES = {EOT, "<|endoftext|>", "</s>"}
_END_OF_WORD = "</w>"  # CLIP BPE: last piece of a word
_WORD_START = "\u2581"  # SentencePiece "▁": first piece of a word


def byte_level_alphabet() -> dict[str, int]:
    """CLIP's (GPT-2's) byte-level BPE: the printable character that stands for each byte -> the byte,
    printable bytes first, in the vocabulary's order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]  # stand-ins: the characters from 256 on
    characters = printable + list(range(256, 256 + len(others)))
    return {chr(character): byte for byte, character in zip(printable + others, characters)}


_BYTES_OF = byte_level_alphabet()


def decode_piece(text: str) -> str:
    """A BPE word as the user typed it ("cafÃ©" -> "café"); text outside the byte alphabet is kept."""
    if not all(character in _BYTES_OF for character in text):
        return text
    return bytes(_BYTES_OF[character] for character in text).decode("utf-8", errors="replace")


class WordNotInPrompt(KeyError):
    """The word is not among the prompt's words (open-vocabulary methods can still map it)."""


@dataclass(frozen=True)
class Word:
    """One word of a prompt and the positions of its BPE pieces among the model's tokens."""

    text: str
    token_indices: tuple[int, ...]


@dataclass(frozen=True)
class PromptTokens:
    """The tokens a text encoder saw for one prompt.

    ``ids`` and ``strings`` have the text encoder's full length (e.g. 77). ``sot_index`` is 0 for CLIP
    and ``None`` for T5, which has no start token. ``eot_index`` is the position of the first EOT
    after the words; everything after it is padding. ``added_tokens`` are the
    prompt's tokens that were added to the tokenizer (textual inversion). ``streams`` names the text
    encoders whose tokens are joined, with the first position of each (SD3: ``(("clip", 0), ("t5", 77))``).
    """

    ids: tuple[int, ...]
    strings: tuple[str, ...]
    added_tokens: tuple[str, ...] = ()
    streams: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.strings):
            raise ValueError(f"{len(self.ids)} ids but {len(self.strings)} token strings")
        if not self.ids:
            raise ValueError("a prompt has at least the SOT and EOT tokens; got no tokens")

    @classmethod
    def from_ids(cls, ids: Sequence[int], tokenizer) -> "PromptTokens":
        ids = [int(i) for i in ids]
        strings = tuple(tokenizer.convert_ids_to_tokens(ids))
        added_ids = set(tokenizer.get_added_vocab().values()) - set(tokenizer.all_special_ids)
        added = [string for i, string in zip(ids, strings) if i in added_ids]
        return cls(tuple(ids), strings, tuple(dict.fromkeys(added)))

    @classmethod
    def from_text(cls, text: str, tokenizer) -> "PromptTokens":
        """Tokenize ``text`` as a CLIP pipeline does (padded to ``model_max_length``, truncated)."""
        ids = tokenizer(
            text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
        ).input_ids
        return cls.from_ids(ids, tokenizer)

    # -- special positions ------------------------------------------------------------------
    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def sot_index(self) -> int | None:
        return 0 if self.strings[0] in _SOT_ALIASES else None

    @property
    def _first_piece(self) -> int:
        return 0 if self.sot_index is None else 1

    @property
    def eot_index(self) -> int:
        for index in range(self._first_piece, self.length):
            if self.strings[index] in _EOT_ALIASES:
                return index
        return self.length - 1

    @property
    def padding_indices(self) -> tuple[int, ...]:
        return tuple(range(self.eot_index + 1, self.length))

    @property
    def maybe_truncated(self) -> bool:
        """True when the prompt filled every position, so the tokenizer may have cut words off."""
        return self.eot_index == self.length - 1

    # -- words ------------------------------------------------------------------------------
    @property
    def _is_sentencepiece(self) -> bool:
        return any(piece.startswith(_WORD_START) for piece in self.strings)

    @property
    def words(self) -> tuple[Word, ...]:
        """The prompt's words before EOT, each with its token positions."""
        words: list[Word] = []
        pieces: list[str] = []
        indices: list[int] = []
        for index in range(self._first_piece, self.eot_index):
            piece = self.strings[index]
            if piece.startswith(_WORD_START):  # SentencePiece: a new word starts here
                if pieces:
                    words.append(Word("".join(pieces), tuple(indices)))
                pieces, indices = [piece[len(_WORD_START):]], [index]
                continue
            if piece in self.added_tokens:
                if pieces:  # pieces without an end marker before an added token
                    words.append(Word("".join(pieces), tuple(indices)))
                    pieces, indices = [], []
                base = _multi_vector_base(piece, self.added_tokens)
                if base is not None and words and words[-1].text == base:
                    words[-1] = Word(base, words[-1].token_indices + (index,))
                else:
                    words.append(Word(piece, (index,)))
                continue
            pieces.append(piece)
            indices.append(index)
            if piece.endswith(_END_OF_WORD):
                text = "".join(pieces)[: -len(_END_OF_WORD)]
                words.append(Word(decode_piece(text), tuple(indices)))
                pieces, indices = [], []
        if pieces:  # SentencePiece's last word, or a BPE word cut by truncation (no end marker)
            text = "".join(pieces)
            words.append(Word(text if self._is_sentencepiece else decode_piece(text), tuple(indices)))
        return tuple(words)

    def stream(self, name: str) -> tuple["PromptTokens", int]:
        """The tokens of one text encoder (``"clip"``, ``"t5"``) and the position its tokens start at."""
        names = [stream for stream, _ in self.streams]
        if name not in names:
            raise KeyError(f"this prompt has no {name!r} text stream; its streams: {names or 'one, unnamed'} (use stream=None)")
        start, stop = [*(first for _, first in self.streams), self.length][names.index(name):][:2]
        return PromptTokens(self.ids[start:stop], self.strings[start:stop], self.added_tokens), start

    def token_indices(self, word: str | int, occurrence: int = 0, stream: str | None = None) -> tuple[int, ...]:
        """Token positions of ``word`` (one or more words, e.g. "traffic light"), or of a token index.

        ``occurrence`` picks among repeats (0 = first). SOT and EOT are addressed as ``"<sot>"`` and
        ``"<eot>"`` (or the tokenizer's own strings). With several text streams (SD3: CLIP then T5) a word
        is looked up in ``stream``; None: the first stream that holds the word (CLIP, then T5, e.g. when
        CLIP cut a long prompt at 77 tokens). The positions say which stream was used.
        """
        if isinstance(word, int) and stream is not None:
            raise ValueError(f"stream={stream!r} applies to words; a token index ({word}) is one position already")
        if isinstance(word, str) and (stream is not None or len(self.streams) > 1):
            for name in [stream] if stream is not None else [name for name, _ in self.streams]:
                tokens, start = self.stream(name)
                try:
                    return tuple(start + i for i in tokens.token_indices(word, occurrence))
                except WordNotInPrompt:
                    if stream is not None or name == self.streams[-1][0]:
                        raise
        if isinstance(word, int):
            if not -self.length <= word < self.length:
                raise IndexError(f"token index {word} is outside the {self.length} tokens")
            return (word % self.length,)
        query = word.strip().lower()
        if not query:
            raise ValueError("the word to look up is empty; pass a word of the prompt or a token index")
        if query in _SOT_ALIASES | _EOT_ALIASES and occurrence != 0:
            raise KeyError(f"{word!r} occurs once per prompt; occurrence={occurrence} has no meaning for it (use 0)")
        if query in _SOT_ALIASES:
            if self.sot_index is None:
                raise KeyError("this tokenizer (SentencePiece, as T5's) has no start token; use '<eot>' or a word")
            return (self.sot_index,)
        if query in _EOT_ALIASES:
            return (self.eot_index,)
        wanted, found = query.split(), self.words
        words = [w.text.lower() for w in found]
        starts = [i for i in range(len(words) - len(wanted) + 1) if words[i : i + len(wanted)] == wanted]
        if not starts:
            hint = " The prompt was cut at the text encoder's length, which may have dropped it." if self.maybe_truncated else ""
            raise WordNotInPrompt(f"{word!r} is not in the prompt {self.text!r}.{hint} Use open-vocabulary maps "
                                  "(daamlib.openvocab or daamlib.linear) for words that were not in the prompt.")
        if not 0 <= occurrence < len(starts):
            raise KeyError(f"{word!r} occurs {len(starts)} time(s) in the prompt; occurrence={occurrence} "
                           f"is out of range (use 0..{len(starts) - 1})")
        start = starts[occurrence]
        return tuple(i for w in found[start : start + len(wanted)] for i in w.token_indices)

    @property
    def text(self) -> str:
        """The prompt as the text encoder saw it (lower-cased, after truncation)."""
        return " ".join(w.text for w in self.words)

    def label(self, index: int) -> str:
        """A readable name for a token position: ``<sot>``, ``<eot>``, ``<pad>`` or the piece."""
        if index == self.sot_index:
            return SOT
        if index == self.eot_index:
            return EOT
        if index > self.eot_index:
            return "<pad>"
        return self.strings[index].replace(_END_OF_WORD, "").replace(_WORD_START, "")


def _multi_vector_base(piece: str, added_tokens: tuple[str, ...]) -> str | None:
    """``"<tok>"`` for ``"<tok>_3"`` when ``<tok>`` is an added token (diffusers' multi-vector naming)."""
    match = re.fullmatch(r"(.+)_\d+", piece)
    return match.group(1) if match and match.group(1) in added_tokens else None
