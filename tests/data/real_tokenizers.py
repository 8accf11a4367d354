"""Tokenizers of released models (``tokenizers/``, see its README), loaded from the repository alone.

``load(name)`` gives the tokenizer as released (its ``tokenizer.json`` sha256 checked against
``index.json``); ``with_tokens(name, specials)`` one with chat templates' control tokens added as
special tokens (what ``clone_chat_template`` does to a base model's tokenizer), so any template can
be paired with any of them. Building a 128k-vocabulary tokenizer takes seconds: they are cached, and
``templated`` gives a cheap copy with a template set.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import lzma
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "tokenizers"
INDEX: dict[str, dict[str, Any]] = json.loads((HERE / "index.json").read_text(encoding="utf-8"))
NAMES = sorted(INDEX)


@functools.cache
def _directory(name: str) -> Path:
    """The tokenizer's files, decompressed into a folder of this process's own."""
    raw = lzma.decompress((HERE / name / "tokenizer.json.xz").read_bytes())
    assert hashlib.sha256(raw).hexdigest() == INDEX[name]["tokenizer.json sha256"], f"{name} was edited"
    out = Path(tempfile.mkdtemp(prefix=f"sftrainer-{name}-"))
    (out / "tokenizer.json").write_bytes(raw)
    (out / "tokenizer_config.json").write_bytes((HERE / name / "tokenizer_config.json").read_bytes())
    return out


@functools.cache
def _loaded(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_directory(name)))


def load(name: str) -> Any:
    """A fresh copy of the released tokenizer."""
    return copy.deepcopy(_loaded(name))


@functools.cache
def with_tokens(name: str, specials: tuple[str, ...] = ()) -> Any:
    """The released tokenizer with ``specials`` added as special tokens (those it lacks). Shared
    between callers: do not change it (``templated`` gives a copy with a chat template)."""
    tok = load(name)
    missing = [t for t in specials if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return tok


def templated(tok: Any, chat_template: str | None) -> Any:
    """``tok`` with a chat template of its own: a shallow copy, which shares the (unchanged) backend
    tokenizer, so that a large vocabulary is not built again for every template."""
    out = copy.copy(tok)
    out.chat_template = chat_template
    return out
