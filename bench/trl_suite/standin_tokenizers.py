"""Tokenizers that stand in for the hub tokenizers TRL's tests load, built in-process (no network).

Each family is a byte-level BPE trained on the stand-in data's text (so English words of the test
rows are single tokens, as in the released 100k+-token vocabularies), plus the family's own added
tokens, BOS / EOS / pad and a chat template:

- where the installed TRL package ships the family's template (``trl/chat_templates``: the released
  templates TRL recognises, e.g. to train on assistant turns only), that file, read at build time and
  not stored here: TRL's tests run on hub tokenizers that carry exactly these;
- else the released template this repository keeps (``tests/data/chat_templates``, byte for byte,
  with provenance in its ``index.json``), or none.

Control tokens a template writes (``<|im_start|>``, ``<think>``, ``[gMASK]`` ...) that the family
does not list are added as special tokens, as the released tokenizers have them, except in families
whose list is complete (``complete=True``: Qwen, DeepSeek-R1-Distill, gpt-oss).

Where a test reads token ids (``<|im_start|>`` is 151644 in the Qwen tokenizers), the family places
its added tokens at the released ids: the BPE vocabulary is padded with filler entries no merge can
produce, so the ids match and the filler rows are never seen in the data.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parents[2] / "tests" / "data" / "chat_templates"
BPE_VOCAB = 4000  # an upper bound: the trainer stops when no pair is left to merge
CONTROL_TOKEN = re.compile(
    r"<\|[A-Za-z_]+\|>|<｜[^｜]+｜>|\[[gs]?MASK\]|<sop>|<eop>|</?(?:think|tool_call|tool_response|arg_key|arg_value)>"
)
# The family's template in trl/chat_templates, where TRL ships it.
TRL_TEMPLATES = {
    "qwen2.5": "qwen2_5",
    "qwen3": "qwen3",
    "r1-distill-qwen": "deepseek_r1_distill",
    "deepseek-v3": "deepseekv3",
    "command-r": "cohere2",
    "gpt-oss": "gptoss",
    "lfm2": "lfm2",
    "lfm2.5": "lfm2_2_5",
    "glm4.5": "glm4moe",
    "nemotron": "nemotron_3_nano",
}


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
    complete: bool = False  # True: ``added`` lists every added token (none is taken from the template)
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
        Family("qwen2.5", _QWEN25, "<|im_end|>", pad="<|endoftext|>", first_added_id=151643, template="qwen2.5-instruct", complete=True),
        Family("qwen3", _QWEN3, "<|im_end|>", pad="<|endoftext|>", first_added_id=151643, template="qwen3", complete=True),
        Family(
            "r1-distill-qwen", _DEEPSEEK, "<｜end▁of▁sentence｜>", bos="<｜begin▁of▁sentence｜>",
            pad="<｜end▁of▁sentence｜>", add_bos=True, first_added_id=151643, template="deepseek-r1-distill-qwen",
            complete=True,
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
            "<|return|>", bos="<|startoftext|>", pad="<|endoftext|>", template="gpt-oss", complete=True,
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
        *(
            Family(
                name,
                _special("<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
                         "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_response_start|>",
                         "<|tool_response_end|>"),
                "<|im_end|>", bos="<|startoftext|>", pad="<|pad|>", add_bos=True, template="lfm2",
            )
            for name in ("lfm2", "lfm2.5")
        ),
    )
}  # fmt: skip


def chat_template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _trl_templates() -> Path | None:
    spec = importlib.util.find_spec("trl")  # located, not imported
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "chat_templates"
    return folder if folder.is_dir() else None


def template_of(family: Family) -> str | None:
    """The family's chat template: TRL's copy of the released one, else this repository's, else none."""
    folder, name = _trl_templates(), TRL_TEMPLATES.get(family.name)
    if folder is not None and name and (folder / f"{name}.jinja").is_file():
        return (folder / f"{name}.jinja").read_text(encoding="utf-8")
    return chat_template(family.template) if family.template else None


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

    template = template_of(family)
    listed = {text for text, _ in family.added}
    found = {} if family.complete else dict.fromkeys(CONTROL_TOKEN.findall(template or ""))
    added = (*family.added, *((t, True) for t in found if t not in listed))
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
        for i, (text, special) in enumerate(added)
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
        additional_special_tokens=[t for t, special in added if special and t not in named],
    )
    fast.chat_template = template
    return fast
