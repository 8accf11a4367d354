"""Tokenizers and chat templates built in-process (no hub) that mimic the families sftrainer must handle.

Two tokenizer kinds, each trained in well under a second on a small corpus:

- ``byte_level``: GPT-2 / Llama-3 / Qwen style byte-level BPE (``pre_tokenizers.ByteLevel``).
- ``metaspace``: Llama-2 / Mistral / Gemma / Phi-3 style SentencePiece look-alike (``Metaspace``
  pre-tokenizer, ``▁`` for spaces, a ``▁`` prepended to the first word).

The templates are written here to mimic each family's layout (headers, end-of-turn tokens, BOS
handling, quirks such as Phi-3 ending a finished conversation with EOS). They are not copies.

``TEMPLATES`` maps a name to (factory, the end-of-turn text every trained assistant turn ends with);
``trained_spans`` decodes the trained runs of a row; ``prep`` runs ``prepare`` on a list of dicts.
"""

from __future__ import annotations

import functools
from typing import Any

from sftrainer.model import prepare_tokenizer

# Conversations used across the tests, and the text the tokenizers are trained on.
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]
NO_SYSTEM = CONVERSATION[1:]
THREE_TURNS = [
    *NO_SYSTEM,
    {"role": "user", "content": "Name a river there."},
    {"role": "assistant", "content": "The Tiber."},
]

CORPUS = [
    "What is the capital of France? The capital is Paris.",
    "And of Italy? Rome, of course. Name a river there. The Tiber.",
    "You are a terse assistant. You are a helpful assistant.",
    "Question: what is two plus two? Answer: four. The answer is 4.",
    "Translate to French: good morning. Bonjour. Write a haiku about the sea.",
    "Count the words: apple berry cat dog. Reverse the words: egg fish goat.",
    "system user assistant model human gpt tool 0 1 2 3 4 5 6 7 8 9",
    "The quick brown fox jumps over the lazy dog, again and again, said the teacher.",
    "Summarise: the cat sat on the mat. Hello world! How are you today? I am fine, thanks.",
    "[INST] [/INST] ### User: ### Assistant: <<SYS>> <</SYS>> : ; ! ? . , ' \" ( ) - + = *",
]


def _corpus() -> list[str]:
    return [*CORPUS, *(m["content"] for m in THREE_TURNS), CONVERSATION[0]["content"]] * 3


@functools.cache
def _trained(kind: str, specials: tuple[str, ...], vocab_size: int) -> str:
    """Train once per (kind, specials); returns the tokenizer JSON so each caller gets a fresh copy."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "byte_level":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted({ch for line in _corpus() for ch in line.replace(" ", "▁")} | {"▁", "\n"})
        specials = ("<unk>", *specials)
    else:
        raise ValueError(kind)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def build(
    kind: str,
    *,
    bos: str | None,
    eos: str,
    specials: tuple[str, ...] = (),
    add_bos: bool = False,
    pad: str | None = None,
    chat_template: str | None = None,
    vocab_size: int = 400,
) -> Any:
    """A ``PreTrainedTokenizerFast``; ``add_bos`` makes it put BOS before text like Llama and Gemma."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    all_specials = tuple(dict.fromkeys(t for t in (bos, eos, pad, *specials) if t))
    tok = Tokenizer.from_str(_trained(kind, all_specials, vocab_size))
    if add_bos:
        assert bos is not None
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    extra = [t for t in specials if t not in (bos, eos, pad)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token="<unk>" if kind == "metaspace" else None,
        additional_special_tokens=extra,
    )
    fast.chat_template = chat_template
    return fast


# ---- templates ------------------------------------------------------------------------------
# Written with explicit string expressions so whitespace is exactly what the family renders.

CHATML = (  # Qwen2: a default system prompt when none is given; turns end with <|im_end|>\n
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3 = (  # emits BOS itself although the tokenizer adds BOS too; end of turn <|eot_id|> != EOS
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)

GEMMA = (  # role "model"; the system prompt is folded into the first user turn
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (ns.system if loop.index0 <= 1 and role == 'user' else '')"
    " + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

LLAMA2 = (  # Mistral / Llama-2: BOS before every [INST]; the answer follows a space and ends with EOS
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{%- set ns.system = '<<SYS>>\\n' + m['content'] + '\\n<</SYS>>\\n\\n' -%}"
    "{%- elif m['role'] == 'user' -%}"
    "{{ bos_token + '[INST] ' + ns.system + m['content'] | trim + ' [/INST]' }}{%- set ns.system = '' -%}"
    "{%- elif m['role'] == 'assistant' -%}{{ ' ' + m['content'] | trim + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

PHI3 = (  # <|user|>/<|assistant|> headers, <|end|> ends a turn; a finished conversation ends with EOS
    "{%- for m in messages -%}"
    "{{ '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
)

CHATML_GENERATION = (  # the same layout with {% generation %} markers around the trained text
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}"
    "{{ '<|im_start|>assistant\\n' }}{%- generation -%}{{ m['content'] + '<|im_end|>' }}{%- endgeneration -%}"
    "{{ '\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

PLAIN = (  # no special token at all: nothing ends a turn, so sftrainer must append and train EOS
    "{%- for m in messages -%}{{ m['role'] | capitalize + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant: ' }}{%- endif -%}"
)


def chatml() -> Any:
    """Qwen2-like: byte-level, no BOS, EOS is <|im_end|> (the end-of-turn token)."""
    return build(
        "byte_level",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        specials=("<|im_start|>",),
        chat_template=CHATML,
    )


def llama3() -> Any:
    """Llama-3-like: byte-level, adds BOS, template also emits BOS; <|eot_id|> ends a turn."""
    return build(
        "byte_level",
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        specials=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        add_bos=True,
        chat_template=LLAMA3,
    )


def gemma() -> Any:
    """Gemma-like: Metaspace, adds <bos>, template also emits it; <end_of_turn> ends a turn."""
    return build(
        "metaspace",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        specials=("<start_of_turn>", "<end_of_turn>"),
        add_bos=True,
        chat_template=GEMMA,
    )


def llama2() -> Any:
    """Llama-2 / Mistral-like: Metaspace, adds <s>, [INST] is plain text, the answer ends with </s>."""
    return build("metaspace", bos="<s>", eos="</s>", add_bos=True, chat_template=LLAMA2)


def phi3() -> Any:
    """Phi-3-like: Metaspace, adds <s> (the template does not), <|end|> ends a turn."""
    return build(
        "metaspace",
        bos="<s>",
        eos="<|endoftext|>",
        specials=("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
        add_bos=True,
        chat_template=PHI3,
    )


def chatml_generation() -> Any:
    return build(
        "byte_level",
        bos=None,
        eos="<|im_end|>",
        specials=("<|im_start|>",),
        chat_template=CHATML_GENERATION,
    )


def plain() -> Any:
    """A template without any end-of-turn token; EOS is a special token the template never emits."""
    return build("byte_level", bos=None, eos="<|endoftext|>", chat_template=PLAIN)


def plain_metaspace() -> Any:
    """The same template on a SentencePiece-style tokenizer: no phantom "▁" where pieces meet."""
    return build("metaspace", bos="<s>", eos="</s>", add_bos=True, chat_template=PLAIN)


def default_with_bos() -> Any:
    """No chat template: ``prepare_tokenizer`` gives it sftrainer's default (with BOS, as it adds one)."""
    return prepare_tokenizer(build("byte_level", bos="<s>", eos="</s>", add_bos=True))


def default_without_bos() -> Any:
    return prepare_tokenizer(build("metaspace", bos=None, eos="</s>"))


# name -> (factory, end-of-turn token text the trained span of every assistant turn must end with)
TEMPLATES: dict[str, tuple[Any, str | None]] = {
    "chatml": (chatml, "<|im_end|>"),
    "llama3": (llama3, "<|eot_id|>"),
    "gemma": (gemma, "<end_of_turn>"),
    "llama2": (llama2, "</s>"),
    "phi3": (phi3, "<|end|>"),
    "chatml_generation": (chatml_generation, "<|im_end|>"),
    "plain": (plain, "<|endoftext|>"),
    "plain_metaspace": (plain_metaspace, "</s>"),
    "default_with_bos": (default_with_bos, "</s>"),
    "default_without_bos": (default_without_bos, "</s>"),
}


# ---- helpers for the tests ------------------------------------------------------------------


def trained_spans(tokenizer: Any, input_ids: list[int], labels: list[int]) -> list[str]:
    """Decode each run of consecutive trained tokens (label != -100), special tokens included."""
    from sftrainer.constants import IGNORE_INDEX

    assert len(input_ids) == len(labels)
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for tok, label in zip(input_ids, labels):
        if label != IGNORE_INDEX:
            assert label == tok, "a trained label must be its own input token (labels are not shifted)"
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(tok)
        previous = label
    return [tokenizer.decode(span) for span in spans]


def prep(rows: Any, tokenizer: Any, **settings: Any) -> tuple[list[dict], Any]:
    """``prepare`` a list of dicts (or a Dataset) with ``DataSettings(**settings)``; rows as dicts."""
    from sftrainer.data.load import load
    from sftrainer.data.prepare import DataSettings, prepare

    settings.setdefault("max_length", None)
    dataset, stats = prepare(load(rows), tokenizer, DataSettings(**settings))
    return list(dataset), stats
