"""A tokenizer as GGUF metadata, read from its own definition (``tokenizer.json``), for llama.cpp.

Contract: ``vocab_metadata(tokenizer, n_vocab)`` gives every ``tokenizer.*`` key llama.cpp reads:

- byte-level BPE (GPT-2, Llama 3, Qwen2, the built-in model): ``tokenizer.ggml.model = "gpt2"``, the
  tokens (byte-level text, as in ``tokenizer.json``), their types and the merges, and the
  pre-tokenizer (``tokenizer.ggml.pre``) named from the tokenizer's own split pattern (``PRE_TOKENIZERS``);
- SentencePiece-style BPE (Llama 2, Mistral: ``▁`` for spaces, byte fallback):
  ``tokenizer.ggml.model = "llama"`` with the tokens, their types and scores. llama.cpp's SentencePiece
  tokenizer merges the adjacent pair whose joined text has the highest score; the score of a token is
  minus the rank of the first merge that makes it, so it merges in the order the BPE merges do;
- the special tokens (BOS, EOS, end-of-turn, UNK, PAD), whether BOS / EOS are added (as the tokenizer
  does it, by encoding a text), and the chat template, verbatim.

llama.cpp's converter instead names a BPE pre-tokenizer by hashing its output on a fixed text, so it
refuses vocabularies it has not seen (the built-in one among them). Here an unknown split pattern is
refused by name. llama.cpp's own tokenization is checked against transformers' in ``tests/test_gguf.py``.

Token types are llama.cpp's: an added special token is CONTROL (never produced from text unless special
tokens are parsed), an added non-special token USER_DEFINED (matched in text as a whole), ``<0xNN>`` of a
byte-fallback vocabulary BYTE, the unknown token UNKNOWN, ids the tokenizer lacks (embedding rows past it)
UNUSED, named ``[PAD<id>]``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from sftrainer.errors import ConfigError

# llama.cpp's pre-tokenizer names (src/llama-vocab.cpp) by the split pattern of tokenizer.json.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    GPT2_PATTERN: "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}  # fmt: skip
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# gguf.TokenType values (kept here so that reading a tokenizer does not import gguf)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class VocabMetadata:
    """The ``tokenizer.*`` keys of a GGUF file (``write`` adds them to a ``gguf.GGUFWriter``)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # tokenizer.ggml.pre ("gpt2" models only)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos / eos / eot / unk / pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None  # "llama" models: a "▁" before the first word
    chat_template: str | None = None

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        for name, token_id in self.special.items():
            getattr(writer, f"add_{name}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def vocab_metadata(tokenizer: Any, n_vocab: int, eot_id: int | None = None) -> VocabMetadata:
    """The GGUF tokenizer metadata of a transformers fast ``tokenizer`` for a model of ``n_vocab``
    embedding rows (``eot_id``: the chat template's end-of-turn token, where it is not EOS)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"{type(tokenizer).__name__} has no tokenizer.json definition (a slow tokenizer); GGUF export "
            "needs a fast tokenizer"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ConfigError(f"GGUF export supports BPE tokenizers; this one is {model.get('type')!r}")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens") or []}
    vocab.update({content: t["id"] for content, t in added.items()})
    if max(vocab.values()) >= n_vocab:
        raise ConfigError(
            f"the tokenizer has ids up to {max(vocab.values())} but the model has {n_vocab} embedding rows"
        )
    by_id = {i: text for text, i in vocab.items()}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    spm = _is_sentencepiece_style(spec)
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        tokens.append(text)
        if text in added:
            types.append(CONTROL if added[text]["special"] else USER_DEFINED)
        elif spm and text == model.get("unk_token"):
            types.append(UNKNOWN)
        elif spm and model.get("byte_fallback") and BYTE_TOKEN.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    meta = VocabMetadata(
        model="llama" if spm else "gpt2",
        pre=None if spm else pre_tokenizer_name(spec),
        tokens=tokens,
        types=types,
        scores=_merge_scores(tokens, merges) if spm else None,
        merges=None if spm else merges,
        add_space_prefix=_prepends_space(spec) if spm else None,
    )
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            meta.special[name] = token_id
    if eot_id is not None:
        meta.special["eot"] = eot_id
    meta.add_bos, meta.add_eos = _adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    meta.chat_template = template.get("default") if isinstance(template, dict) else template
    return meta


def _is_sentencepiece_style(spec: dict[str, Any]) -> bool:
    """SentencePiece converted to tokenizer.json: spaces as "▁" (a Metaspace pre-tokenizer, or a
    normalizer replacing " "), not byte-level BPE."""
    if _find(spec.get("pre_tokenizer"), "ByteLevel") or _find(spec.get("decoder"), "ByteLevel"):
        return False
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return "▁" in text or bool(spec["model"].get("byte_fallback"))


def _prepends_space(spec: dict[str, Any]) -> bool:
    metaspace = _find(spec.get("pre_tokenizer"), "Metaspace")
    if metaspace:
        return metaspace[0].get("prepend_scheme", "always") != "never"
    return any(n.get("prepend") == "▁" for n in _find(spec.get("normalizer"), "Prepend"))


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the split pattern of a byte-level BPE ``tokenizer.json`` (``spec``)."""
    pre = spec.get("pre_tokenizer")
    splits = _find(pre, "Split")
    patterns = [s["pattern"].get("Regex") or re.escape(s["pattern"].get("String", "")) for s in splits]
    patterns += [GPT2_PATTERN for b in _find(pre, "ByteLevel") if b.get("use_regex", True)]
    if len(patterns) == 1 and patterns[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[patterns[0]]
    raise ConfigError(
        f"the tokenizer's pre-tokenizer splits text with {patterns or 'no pattern'}, which llama.cpp has no "
        f"name for here; supported: {', '.join(sorted(set(PRE_TOKENIZERS.values())))} "
        "(llama.cpp's split patterns of those names)"
    )


def _find(node: Any, kind: str) -> list[dict[str, Any]]:
    """Every component of type ``kind`` in a tokenizer.json normalizer / pre-tokenizer / decoder."""
    if not isinstance(node, dict):
        return []
    found = [node] if node.get("type") == kind else []
    for child in node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []:
        found += _find(child, kind)
    return found


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else (0.0 if len(t) == 1 else floor) for t in tokens]


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding a text adds BOS / EOS (what the tokenizer does, not what its config says)."""
    plain = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return adds_bos, adds_eos
