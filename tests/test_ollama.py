"""The Ollama Modelfile: its TEMPLATE, rendered by a small Go text/template renderer (the constructs
the templates use), equals the training rendering of the released chat templates; stop tokens are
listed exactly; a template of no known family gets no TEMPLATE and says what to write."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sftrainer import builtin
from sftrainer.ollama import modelfile, modelfile_for_run, render_training

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
INDEX = json.loads((TEMPLATES / "index.json").read_text())

# ---- a tiny Go text/template renderer: {{ .X }}, {{- -}}, if / else if / else / end, range (with
# `$i, $m :=`), $ and $var, string and int literals, eq (several operands), ne, and, or, not ----

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+')


def _parse(text: str) -> list[Any]:
    """The template as a list of literal strings and action strings, trimming applied."""
    parts: list[Any] = []
    pos = 0
    for match in ACTION.finditer(text):
        literal = text[pos : match.start()]
        if match.group(1):
            literal = literal.rstrip()
        parts.append(("text", literal))
        parts.append(("action", match.group(2), bool(match.group(3))))
        pos = match.end()
    parts.append(("text", text[pos:]))
    for i, part in enumerate(parts):  # a `-}}` trims the whitespace after it
        if part[0] == "action" and part[2]:
            parts[i + 1] = ("text", parts[i + 1][1].lstrip())
    return parts


def _block(parts: list[Any], i: int, stops: tuple[str, ...]) -> tuple[list[Any], int]:
    """Nodes up to an action starting with one of ``stops``; returns them and the index of that action."""
    nodes: list[Any] = []
    while i < len(parts):
        part = parts[i]
        if part[0] == "text":
            nodes.append(("text", part[1]))
            i += 1
            continue
        action = part[1]
        word = action.split(" ", 1)[0]
        if word in stops:
            return nodes, i
        if word in ("if", "range"):
            arms, i = [], i
            head = action
            while True:
                body, i = _block(parts, i + 1, ("else", "end"))
                arms.append((head, body))
                stop = parts[i][1]
                if stop == "end":
                    break
                head = stop
            nodes.append((word, arms))
            i += 1
        else:
            nodes.append(("out", action))
            i += 1
    return nodes, i


def _tokens(expr: str) -> list[str]:
    return TOKEN.findall(expr)


def _value(tokens: list[str], scope: dict[str, Any]) -> tuple[Any, list[str]]:
    token, rest = tokens[0], tokens[1:]
    if token == "(":
        value, rest = _call(rest, scope)
        assert rest[0] == ")"
        return value, rest[1:]
    if token.startswith('"'):
        return json.loads(token), rest
    if token.lstrip("-").isdigit():
        return int(token), rest
    if token.startswith("$"):
        name, *fields = token.split(".")
        value = scope[name]
    else:
        assert token.startswith("."), token
        value, fields = scope["."], token.split(".")[1:]
    for name in filter(None, fields):
        value = value.get(name, "") if isinstance(value, dict) else getattr(value, name)
    return value, rest


def _truth(value: Any) -> bool:
    return bool(value)


FUNCS = {
    "eq": lambda first, *others: any(first == other for other in others),
    "ne": lambda a, b: a != b,
    "and": lambda *args: next((a for a in args if not _truth(a)), args[-1]),
    "or": lambda *args: next((a for a in args if _truth(a)), args[-1]),
    "not": lambda a: not _truth(a),
}


def _call(tokens: list[str], scope: dict[str, Any]) -> tuple[Any, list[str]]:
    if tokens[0] in FUNCS:
        func, rest, args = FUNCS[tokens[0]], tokens[1:], []
        while rest and rest[0] != ")":
            value, rest = _value(rest, scope)
            args.append(value)
        return func(*args), rest
    return _value(tokens, scope)


def _eval(expr: str, scope: dict[str, Any]) -> Any:
    value, rest = _call(_tokens(expr), scope)
    assert not rest, f"unparsed: {rest}"
    return value


def _run(nodes: list[Any], scope: dict[str, Any]) -> str:
    out = []
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "out":
            out.append(str(_eval(node[1], scope)))
        elif node[0] == "if":
            for head, body in node[1]:
                condition = head.split(" ", 1)[1] if head != "else" else None
                if condition is None or _truth(_eval(condition.removeprefix("if "), scope)):
                    out.append(_run(body, scope))
                    break
        else:  # range [$i, $m :=] PIPE [else]
            (head, body), *rest = node[1]
            spec = head.split(" ", 1)[1]
            names: list[str] = []
            if ":=" in spec:
                left, spec = spec.split(":=")
                names = [n.strip() for n in left.split(",")]
            items = _eval(spec.strip(), scope)
            for index, item in enumerate(items):
                inner = {**scope, ".": item}
                if len(names) == 2:
                    inner[names[0]], inner[names[1]] = index, item
                elif names:
                    inner[names[0]] = item
                out.append(_run(body, inner))
            if not items and rest:
                out.append(_run(rest[0][1], scope))
    return "".join(out)


def render_go(template: str, messages: list[dict[str, str]]) -> str:
    """``template`` rendered for ``messages`` as Ollama passes them: ``.System`` the system messages
    joined, ``.Messages`` all of them (Ollama's ``collate`` keeps system messages in the list)."""
    nodes, _ = _block(_parse(template), 0, ())
    listed = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    top = {"System": "\n\n".join(m["content"] for m in messages if m["role"] == "system"), "Messages": listed}
    return _run(nodes, {".": top, "$": top})


def test_the_renderer_reads_go_templates():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    template = '{{- range $i, $m := .Messages }} {{ if eq .Role "user" "x" }}{{ $i }}:{{ $m.Content }}{{ else }}-{{ end }}{{ end -}} !'
    assert render_go(template, messages) == " - 1:U!"
    assert render_go("{{ if and $.System (not .Missing) }}y{{ else if .System }}n{{ end }}", messages) == "y"


# ---- the Modelfile TEMPLATE equals training, by family ----------------------------------------

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is 2+2?"}],
    "one turn, system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "two turns": [
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one, please."},
    ],
    "two turns, system": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Name a fruit."},
        {"role": "assistant", "content": "Apple."},
        {"role": "user", "content": "Another one, please."},
    ],
}
FAMILIES = {
    "qwen2.5-instruct": "ChatML (Qwen2.5",
    "qwen3": "ChatML (Qwen2 / Qwen3",
    "chatml-openhermes": "ChatML (Qwen2 / Qwen3",
    "llama-3.1-instruct": "Llama 3.1",
    "gemma-2-it": "Gemma",
    "gemma-3-it": "Gemma",
    "phi-3-mini-instruct": "Phi-3",
    "phi-3.5-mini-instruct": "Phi-3",
    "mistral-7b-instruct-v0.1": "Mistral v0.1",
    "mistral-7b-instruct-v0.3": "Mistral v0.3",
}


def _check(template: str, bos: str | None, eos: str | None, stops: list[str]) -> tuple[str, list[str]]:
    text, notes = modelfile("model.gguf", template, stops, bos_token=bos, eos_token=eos)
    go = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert go, notes
    checked = 0
    for messages in CONVERSATIONS.values():
        try:
            expected = render_training(template, messages, bos, eos)
        except Exception:  # the training template refuses it (a system message for Gemma 2 / Mistral v0.1)
            continue
        if bos and expected.startswith(bos):
            expected = expected[len(bos) :]  # llama.cpp adds BOS as a token
        assert render_go(go.group(1), messages) == expected
        checked += 1
    assert checked >= 2
    return text, notes


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_template_equals_the_training_rendering(name):
    entry = INDEX[name]
    stops = [entry["eos_token"], entry["end_of_turn"]]
    text, notes = _check(
        (TEMPLATES / f"{name}.jinja").read_text(), entry.get("bos_token"), entry["eos_token"], stops
    )
    assert FAMILIES[name] in notes[0]
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [
        f"PARAMETER stop {json.dumps(t)}" for t in dict.fromkeys(stops)
    ]


def test_the_builtin_models_template(tokenizer):
    text, notes = _check(builtin.CHAT_TEMPLATE, tokenizer.bos_token, tokenizer.eos_token, ["<|im_end|>"])
    assert "ChatML" in notes[0] and any("starts with BOS (<s>)" in n for n in notes)
    assert text.startswith("FROM ./model.gguf\nTEMPLATE")


STOPS = ['PARAMETER stop "<|im_end|>"']  # the built-in model's EOS is its end-of-turn token


def test_a_run_gets_its_stop_tokens_and_adapter(lora_run):
    text, notes = modelfile_for_run(lora_run, "base.gguf", adapter_name="adapter.gguf")
    assert text.splitlines()[:2] == ["FROM ./base.gguf", "ADAPTER ./adapter.gguf"]
    stops = [line for line in text.splitlines() if line.startswith("PARAMETER")]
    assert stops == STOPS
    assert "ChatML" in notes[0]


@pytest.mark.parametrize("name", ["llama-3.2-instruct", "vicuna-1.1", "zephyr-7b-beta"])
def test_an_unknown_template_gets_no_template_and_says_what_to_write(name):
    entry = INDEX[name]
    template = (TEMPLATES / f"{name}.jinja").read_text()
    bos, eos = entry.get("bos_token"), entry["eos_token"]
    text, notes = modelfile("model.gguf", template, [eos], bos_token=bos, eos_token=eos)
    assert "TEMPLATE" not in text
    assert "no TEMPLATE written" in notes[0]
    one_turn = render_training(template, [{"role": "user", "content": "Hi there"}], bos, eos)
    assert repr(one_turn) in notes[0]  # the exact rendering the user's TEMPLATE must produce
