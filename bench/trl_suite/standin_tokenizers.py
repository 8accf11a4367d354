"""Tokenizers that stand in for the hub tokenizers TRL's tests load, built in-process (no network).

Each family is a byte-level BPE trained on the stand-in data's text (so English words of the test
rows are single tokens, as in the released 100k+-token vocabularies), plus the family's own added
tokens, BOS / EOS / pad and the chat template of the released model where this repository keeps one
(``tests/data/chat_templates``, byte for byte, with provenance in its ``index.json``).

Where a test reads token ids (``<|im_start|>`` is 151644 in the Qwen tokenizers), the family places
its added tokens at the released ids: the BPE vocabulary is padded with filler entries no merge can
produce, so the ids match and the filler rows are never seen in the data.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parents[2] / "tests" / "data" / "chat_templates"
BPE_VOCAB = 4000  # an upper bound: the trainer stops when no pair is left to merge


@dataclass(frozen=True)
class Family:
    """A tokenizer family: its added tokens (``(text, special)``, in id order) and settings."""

    name: str
    added: tuple[tuple[str, bool], ...]
    eos: str
    bos: str | None = None
    pad: str | None = None
    unk: str | None = None
    add_bos: bool = False  # put BOS before text, as Llama / Mistral / DeepSeek tokenizers do
    first_added_id: int | None = None  # the released id of the first added token
    template: str | None = None  # a file of tests/data/chat_templates, without .jinja
    extra: dict[str, Any] = field(default_factory=dict)


def _special(*tokens: str) -> tuple[tuple[str, bool], ...]:
    return tuple((t, True) for t in tokens)


def _plain(*tokens: str) -> tuple[tuple[str, bool], ...]:
    return tuple((t, False) for t in tokens)


_QWEN25 = (
    *_special("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>"),
    *_special("<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>"),
    *_special("<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"),
    *_plain(
        "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"
    ),
    *_plain("<|repo_name|>", "<|file_sep|>"),
)
_QWEN3 = (*_QWEN25, *_plain("<tool_response>", "</tool_response>", "<think>", "</think>"))
_DEEPSEEK_TOOLS = _special(
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    "<｜tool▁sep｜>",
)
_DEEPSEEK = (
    *_special("<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<|EOT|>"),
    *_plain("<think>", "</think>"),
    *_DEEPSEEK_TOOLS,
)
_CHATML = _special("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")

FAMILIES = {
    f.name: f
    for f in (
        Family("qwen2.5", _QWEN25, "<|im_end|>", pad="<|endoftext|>", first_added_id=151643, template="qwen2.5-instruct"),
        Family("qwen3", _QWEN3, "<|im_end|>", pad="<|endoftext|>", first_added_id=151643, template="qwen3"),
        Family(
            "r1-distill-qwen", _DEEPSEEK, "<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>", add_bos=True, first_added_id=151643, template="deepseek-r1-distill-qwen",
        ),
        Family(
            "deepseek-v3", _DEEPSEEK, "<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>", add_bos=True, template="deepseek-v3",
        ),
        Family(
            "command-r",
            _special("<BOS_TOKEN>", "<PAD>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                     "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"),
            "<|END_OF_TURN_TOKEN|>", bos="<BOS_TOKEN>", pad="<PAD>", add_bos=True, template="command-r",
        ),
        Family(
            "gpt-oss",
            _special("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>",
                     "<|end|>", "<|message|>", "<|call|>"),
            "<|return|>", bos="<|startoftext|>", pad="<|endoftext|>", template="gpt-oss",
        ),
        Family("mistral", _special("<unk>", "<s>", "</s>"), "</s>", bos="<s>", unk="<unk>", add_bos=True,
               template="mistral-7b-instruct-v0.1"),
        Family("gpt-neox", _special("<|endoftext|>", "<|padding|>"), "<|endoftext|>", bos="<|endoftext|>",
               unk="<|endoftext|>"),
        Family("falcon", _special("<|endoftext|>", "<|pad|>"), "<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>"),
        Family(
            "glm4.5",
            _special("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                     "<|assistant|>", "<|observation|>"),
            "<|endoftext|>", pad="<|endoftext|>",
        ),
        Family("nemotron", (*_special("<unk>", "<s>", "</s>"), *_CHATML[1:3]), "<|im_end|>", bos="<s>", unk="<unk>"),
        Family("olmo3", _CHATML, "<|endoftext|>", bos="<|endoftext|>", pad="<|pad|>"),
        Family(
            "lfm2",
            _special("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                     "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_response_start|>", "<|tool_response_end|>"),
            "<|im_end|>", bos="<|startoftext|>", pad="<|pad|>", add_bos=True, template="lfm2",
        ),
    )
}  # fmt: skip


def chat_template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@functools.cache
def _bpe_json(corpus: tuple[str, ...]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return tok.to_str()


def build(family: Family, corpus: tuple[str, ...]) -> Any:
    """The ``PreTrainedTokenizerFast`` of ``family``, its BPE trained on ``corpus``."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(_bpe_json(corpus))
    vocab: dict[str, int] = spec["model"]["vocab"]
    start = len(vocab) if family.first_added_id is None else family.first_added_id
    if start < len(vocab):
        raise ValueError(f"{family.name}: the BPE vocabulary ({len(vocab)}) reaches the added ids ({start})")
    # Fillers: a NUL byte then text. No merge produces them, so these ids never occur in encoded text.
    vocab.update({f"Āfiller{i}": i for i in range(len(vocab), start)})
    spec["added_tokens"] = [
        {"id": start + i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, (text, special) in enumerate(family.added)
    ]  # fmt: skip
    tok = Tokenizer.from_str(json.dumps(spec))
    if family.add_bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
    named = {family.bos, family.eos, family.pad, family.unk}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token=family.unk,
        additional_special_tokens=[t for t, special in family.added if special and t not in named],
    )
    if family.template:
        fast.chat_template = chat_template(family.template)
    return fast
