"""A CLIP BPE tokenizer built from the vocabulary file that ships inside ``open_clip_torch``.

The result is the same 49408-token vocabulary Stable Diffusion uses (SOT = 49406, EOT = 49407,
77 positions, padded with EOT as in SD 1.x). ``open_clip_torch`` is needed only to build it;
the tokenizer is then saved with the model and loaded by ``transformers`` alone.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # CLIP keeps this many merges of the BPE file


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's reversible byte -> printable-character table, printable bytes first (CLIP's order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    characters = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return tuple(chr(c) for c in characters)


def open_clip_vocabulary_file() -> Path:
    try:
        import open_clip
    except ImportError as error:
        raise ImportError("building the CLIP tokenizer needs open_clip_torch: pip install open_clip_torch") from error
    return Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(bpe_file: str | Path | None = None) -> CLIPTokenizer:
    """The CLIP tokenizer of Stable Diffusion, built offline from the BPE merges file."""
    path = Path(bpe_file) if bpe_file is not None else open_clip_vocabulary_file()
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    alphabet = list(_byte_alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=CLIP_CONTEXT_LENGTH,
        pad_token="<|endoftext|>",
    )
