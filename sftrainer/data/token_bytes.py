"""Where the tokens of a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen, DeepSeek, Phi-4) end, from
their ids alone.

Such a tokenizer writes every byte of its input into exactly one token, in order, so a token's length
in bytes is a property of the token, and the number of tokens in each consecutive segment of a text
follows from the ids and a table of lengths. Asking the tokenizer for offsets instead costs about a
quarter of its time. The table holds only what the tokenizer cannot change:

- the tokenizer is a BPE model behind a ``ByteLevel`` pre-tokenizer that adds no prefix space, with
  no truncation or padding set (checked once; any other tokenizer gets ``None`` from ``of``);
- a row is read this way only when the normalizer leaves its text unchanged and its tokens' lengths
  add up to the text's length in bytes (an added token that strips the whitespace around it, say,
  fails that), and only when a token ends exactly at every segment boundary.

Everything else is left to offsets (``ExampleTokenizer.encode``), which also check the first batch
read this way.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
from tokenizers import pre_tokenizers
from tokenizers.models import BPE

MISSING = 0  # the table's length for an id no text can produce: a row holding it fails the total
# Pre-tokenizers that split text without changing it (a Split may remove what it matches: refused).
KEEPING_PRE_TOKENIZERS = ("ByteLevel", "Split", "Digits", "Punctuation")


class ByteLengths:
    """A tokenizer's ids -> byte lengths, and the token counts of segments from them."""

    def __init__(self, tokenizer: Any, table: np.ndarray):
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.table = table

    @classmethod
    def of(cls, tokenizer: Any) -> ByteLengths | None:
        """The table for a byte-level BPE tokenizer that changes no text, else None."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast") or not isinstance(backend.model, BPE):
            return None
        pre_tokenizer = backend.pre_tokenizer  # its own JSON: the whole tokenizer's is megabytes
        parts = _pre_tokenizer_parts(json.loads(pre_tokenizer.__getstate__()) if pre_tokenizer else None)
        levels = [p for p in parts if p.get("type") == "ByteLevel"]
        if (
            not levels
            or any(p.get("add_prefix_space") for p in levels)
            or any(p.get("type") not in KEEPING_PRE_TOKENIZERS for p in parts)
            or any(p.get("behavior") == "Removed" for p in parts)
        ):
            return None
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        vocab = backend.get_vocab(with_added_tokens=True)
        table = np.full(max(vocab.values(), default=-1) + 1, MISSING, dtype=np.int64)
        for text, i in vocab.items():
            if text in added:  # matched in the raw text: its own UTF-8 bytes
                table[i] = len(text.encode("utf-8"))
            elif text and set(text) <= alphabet:  # one alphabet character per byte
                table[i] = len(text)
        return cls(tokenizer, table)

    def encode(self, texts: list[str]) -> list[list[int]] | None:
        """The ids of each text, as the tokenizer's own call gives them (no special tokens added), or
        None where the tokenizer is set up in a way that call would change (truncation, padding)."""
        backend = self.backend
        split = bool(getattr(self.tokenizer, "split_special_tokens", False))
        if (
            backend.truncation is not None
            or backend.padding is not None
            or backend.encode_special_tokens != split
        ):
            return None
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]

    def counts(self, text: str, ids: list[int], pieces: list[str]) -> list[int] | None:
        """Tokens in each of ``pieces`` (consecutive, joined they are ``text``), or None where that
        cannot be read from the ids: the text is changed by the normalizer, the tokens do not add
        up to its bytes, or a token crosses a boundary between two pieces."""
        if not ids:
            return None
        normalizer = self.backend.normalizer
        if normalizer is not None and normalizer.normalize_str(text) != text:
            return None
        try:
            ends = self.table[ids].cumsum()
        except IndexError:  # an id past the table: not a token of this vocabulary
            return None
        if int(ends[-1]) != len(text.encode("utf-8")):
            return None
        bounds = list(itertools.accumulate(len(piece.encode("utf-8")) for piece in pieces[:-1]))
        at = ends.searchsorted(bounds)  # the token ending at or after each boundary
        if bounds and (int(at[-1]) >= len(ends) or not (ends[at] == bounds).all()):
            return None
        cuts = [0, *(at + 1).tolist(), len(ids)]
        return [b - a for a, b in itertools.pairwise(cuts)]


def _pre_tokenizer_parts(spec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer's parts, a ``Sequence`` flattened."""
    if spec is None:
        return []
    if spec.get("type") == "Sequence":
        return [p for part in spec.get("pretokenizers", []) for p in _pre_tokenizer_parts(part)]
    return [spec]
