"""The Ollama ``Modelfile`` for a GGUF: ``FROM``, ``ADAPTER`` where a GGUF LoRA is used, one
``PARAMETER stop`` per stop token training taught, and a ``TEMPLATE`` that renders what the training
chat template renders.

Ollama's templates are Go ``text/template`` (docs/template.md in ollama/ollama): ``.System`` (the
system messages joined, or the Modelfile's ``SYSTEM``), ``.Messages`` (each ``.Role`` /
``.Content``; system messages stay in it, so the templates below skip them there, as Ollama's own
templates do), ``$.`` for the top level inside ``range``. Ollama appends nothing itself: the
generation prompt is the template's.

The family is recognised from the run's template itself, never from the model's name: the template
renders probe conversations (one turn, a system message, two turns) with ``add_generation_prompt``,
and a family is chosen only where its known rendering equals every probe the template accepts. A
template that matches no family gets no ``TEMPLATE``; the notes say what the user must write.

The ``TEMPLATE`` renders the prompt without the BOS text a training template starts with: llama.cpp
adds BOS as a token where the GGUF says so (``tokenizer.ggml.add_bos_token``), and the note says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]

PROBES: dict[str, Messages] = {
    "one turn": [{"role": "user", "content": "Hi there"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    "two turns": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
    "system, two turns": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
}
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
LLAMA31_PREAMBLE = (
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"  # Llama 3.1's fixed header
)


def _system(messages: Messages) -> str:
    return "\n\n".join(m["content"] for m in messages if m["role"] == "system")  # as Ollama joins them


def _turns(messages: Messages) -> Messages:
    return [m for m in messages if m["role"] in ("user", "assistant")]


def _chatml(default_system: str | None) -> Callable[[Messages], str]:
    def render(messages: Messages) -> str:
        system = _system(messages) or default_system
        text = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
        text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in _turns(messages))
        return text + "<|im_start|>assistant\n"

    return render


def _llama3(preamble: str) -> Callable[[Messages], str]:
    def render(messages: Messages) -> str:
        system = _system(messages)
        head = "<|start_header_id|>{}<|end_header_id|>\n\n"
        text = head.format("system") + preamble + system + "<|eot_id|>" if (system or preamble) else ""
        text += "".join(head.format(m["role"]) + m["content"] + "<|eot_id|>" for m in _turns(messages))
        return text + head.format("assistant")

    return render


def _gemma(messages: Messages) -> str:
    system, text = _system(messages), ""
    for i, m in enumerate(_turns(messages)):
        role = "model" if m["role"] == "assistant" else "user"
        prefix = f"{system}\n\n" if system and i == 0 else ""
        text += f"<start_of_turn>{role}\n{prefix}{m['content']}<end_of_turn>\n"
    return text + "<start_of_turn>model\n"


def _phi3(messages: Messages) -> str:
    system = _system(messages)
    text = f"<|system|>\n{system}<|end|>\n" if system else ""
    text += "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in _turns(messages))
    return text + "<|assistant|>\n"


def _mistral(user: str, assistant: str, eos: str) -> Callable[[Messages], str]:
    def render(messages: Messages) -> str:
        return "".join(
            user.format(m["content"]) if m["role"] == "user" else assistant.format(m["content"], eos)
            for m in _turns(messages)
        )

    return render


# Go templates. Each renders, for Ollama's .System / .Messages, what the renderer beside it does.
_CHATML_TURNS = (
    '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
    "<|im_start|>assistant\n"
)
_LLAMA3_TURNS = (
    '{{ range .Messages }}{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}'
    '<|eot_id|>{{ else if eq .Role "assistant" }}<|start_header_id|>assistant<|end_header_id|>\n\n'
    "{{ .Content }}<|eot_id|>{{ end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


@dataclass(frozen=True)
class Family:
    """A chat-template family: its rendering of a conversation (no BOS text) and its Go template."""

    name: str
    render: Callable[[Messages], str]
    template: str
    note: str = ""


FAMILIES = (
    Family(
        "ChatML (Qwen2.5, with its default system prompt)",
        _chatml(QWEN_SYSTEM),
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}<|im_start|>system\n"
        + QWEN_SYSTEM
        + "<|im_end|>\n{{ end }}"
        + _CHATML_TURNS,
    ),
    Family(
        "ChatML (Qwen2 / Qwen3, OpenHermes, the built-in model)",
        _chatml(None),
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}" + _CHATML_TURNS,
        "checked on plain conversations: a template's reasoning (<think>) and tool handling is not in the TEMPLATE",
    ),
    Family(
        "Llama 3.1 (fixed date header)",
        _llama3(LLAMA31_PREAMBLE),
        "<|start_header_id|>system<|end_header_id|>\n\n"
        + LLAMA31_PREAMBLE
        + "{{ .System }}<|eot_id|>"
        + _LLAMA3_TURNS,
    ),
    Family(
        "Llama 3",
        _llama3(""),
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        + _LLAMA3_TURNS,
    ),
    Family(
        "Gemma 2 / 3",
        _gemma,
        '{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}<start_of_turn>user\n'
        "{{ if and $.System (eq $i 0 1) }}{{ $.System }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
        '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}<end_of_turn>\n{{ end }}{{ end }}'
        "<start_of_turn>model\n",
        "the system prompt goes before the first user message, as Gemma 3's template puts it (Gemma 2's "
        "refuses system messages); `eq $i 0 1`: the first user message is at 1 where Ollama keeps the system "
        "message in .Messages, at 0 where it does not",
    ),
    Family(
        "Phi-3",
        _phi3,
        "{{ if .System }}<|system|>\n{{ .System }}<|end|>\n{{ end }}"
        '{{ range .Messages }}{{ if eq .Role "user" }}<|user|>\n{{ .Content }}<|end|>\n'
        '{{ else if eq .Role "assistant" }}<|assistant|>\n{{ .Content }}<|end|>\n{{ end }}{{ end }}'
        "<|assistant|>\n",
    ),
    Family(
        "Mistral v0.1 ([INST])",
        _mistral("[INST] {} [/INST]", "{}{} ", "</s>"),
        '{{ range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }}{{ .Content }}</s> {{ end }}{{ end }}',
        "the training template has no system role, so the TEMPLATE writes no system prompt (Ollama's SYSTEM "
        "is ignored)",
    ),
    Family(
        "Mistral v0.3 ([INST])",
        _mistral(" [INST] {} [/INST]", " {} {}", "</s>"),
        '{{ range .Messages }}{{ if eq .Role "user" }} [INST] {{ .Content }} [/INST]'
        '{{ else if eq .Role "assistant" }} {{ .Content }} </s>{{ end }}{{ end }}',
        "the training template drops system messages, so the TEMPLATE writes no system prompt (Ollama's "
        "SYSTEM is ignored)",
    ),
)


def render_training(
    chat_template: str, messages: Messages, bos_token: str | None, eos_token: str | None
) -> str:
    """``messages`` rendered by ``chat_template`` with the generation prompt, as
    ``tokenizer.apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` does."""
    from transformers.utils.chat_template_utils import render_jinja_template  # only where a template renders

    result: Any = render_jinja_template(
        conversations=[messages],
        chat_template=chat_template,
        add_generation_prompt=True,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    # transformers 5 returns (renderings, generation indices) though annotated `-> str`
    return str(result[0][0] if isinstance(result, tuple) else result)


def recognise(
    chat_template: str, bos_token: str | None = None, eos_token: str | None = None
) -> tuple[Family | None, dict[str, str], bool]:
    """The family whose rendering equals the template's on every probe it accepts (at least the
    system-less ones), the template's rendering of each probe, and whether it starts with BOS."""
    renderings: dict[str, str] = {}
    for name, messages in PROBES.items():
        try:
            renderings[name] = render_training(chat_template, messages, bos_token, eos_token)
        except Exception:  # a template that refuses a probe (e.g. a system message): judged on the others
            continue
    starts_with_bos = bool(bos_token) and all(r.startswith(str(bos_token)) for r in renderings.values())
    cut = len(str(bos_token)) if starts_with_bos else 0
    stripped = {name: text[cut:] for name, text in renderings.items()}
    if {"one turn", "two turns"} - set(stripped):
        return None, renderings, starts_with_bos
    for family in FAMILIES:
        if all(family.render(PROBES[name]) == text for name, text in stripped.items()):
            return family, renderings, starts_with_bos
    return None, renderings, starts_with_bos


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def modelfile(
    gguf_name: str,
    chat_template: str | None,
    stop_tokens: list[str],
    adapter_name: str | None = None,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> tuple[str, list[str]]:
    """The text of a ``Modelfile`` for ``gguf_name`` (a file beside it) and notes for the user.
    ``adapter_name``: a GGUF LoRA beside it (``ADAPTER``). ``stop_tokens``: every stop token training
    taught (EOS and end-of-turn), one ``PARAMETER stop`` each. ``bos_token`` / ``eos_token``: the
    tokenizer's, which the template may render. No ``TEMPLATE`` for a template of no known family:
    the notes say what to write."""
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    notes: list[str] = []
    family, renderings, starts_with_bos = (
        recognise(chat_template, bos_token, eos_token) if chat_template else (None, {}, False)
    )
    if family is not None:
        if '"""' in family.template:
            raise AssertionError("a TEMPLATE cannot hold three double quotes")  # a bug in FAMILIES
        lines.append(f'TEMPLATE """{family.template}"""')
        notes.append(f"TEMPLATE: the {family.name} family, recognised by rendering probe conversations")
        if family.note:
            notes.append(family.note)
        if starts_with_bos:
            notes.append(
                f"the training template starts with BOS ({bos_token}); the TEMPLATE leaves it out, as llama.cpp "
                "adds it where the GGUF's tokenizer.ggml.add_bos_token is true"
            )
        notes.append(
            "tool calls and tool messages are not in the TEMPLATE; messages are used as given (a training "
            "template that trims whitespace around them renders such messages differently)"
        )
    elif chat_template is None:
        notes.append("the run has no chat template: no TEMPLATE written; Ollama sends the prompt as it is")
    else:
        shown = "\n".join(
            f"  {name}: {json.dumps(PROBES[name])}\n    -> {text!r}" for name, text in renderings.items()
        )
        notes.append(
            "no TEMPLATE written: the training chat template is of no family this export knows (Llama 3, ChatML, "
            "Mistral [INST], Gemma, Phi-3). Write a TEMPLATE (Go text/template: {{ .System }}, {{ range .Messages "
            "}}{{ .Role }} {{ .Content }}{{ end }}) that renders these conversations, with the generation prompt "
            "and without the BOS text, exactly as training did:\n" + shown
        )
    lines += [f"PARAMETER stop {_quoted(token)}" for token in dict.fromkeys(stop_tokens)]
    return "\n".join(lines) + "\n", notes


def modelfile_for_run(
    run_dir: str | Path, gguf_name: str, adapter_name: str | None = None
) -> tuple[str, list[str]]:
    """``modelfile`` for the run in ``run_dir``: its tokenizer's chat template, BOS and EOS, and the
    stop tokens ``sftrainer generate`` stops on (EOS and the template's end-of-turn)."""
    from sftrainer.generate import stop_token_ids
    from sftrainer.run import model_source, read_run
    from sftrainer.setup import load_processing_class
    from sftrainer.vision.processor import text_tokenizer

    run = read_run(run_dir)
    tokenizer: Any = text_tokenizer(load_processing_class(str(run.path), False, model_path=model_source(run)))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    return modelfile(
        gguf_name, template, stops, adapter_name, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
