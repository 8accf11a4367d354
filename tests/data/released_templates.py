"""Chat templates of released models (``chat_templates/``, copied with provenance in ``index.json``)
and tokenizers built for them in-process.

The tokenizers are byte-level BPE trained on a small corpus, with the family's BOS, EOS and
end-of-turn tokens and every control token the template writes (``<|im_start|>``, ``[INST]``,
``<｜Assistant｜>``, ``<think>``, ...) as special tokens, as the released tokenizers have them. The
templates are the released files byte for byte (their sha256 is checked).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import tokenizers_zoo as zoo

HERE = Path(__file__).parent / "chat_templates"
INDEX: dict[str, dict[str, Any]] = json.loads((HERE / "index.json").read_text(encoding="utf-8"))
NAMES = sorted(INDEX)
# The first 24, whose refusals and spans test_released_templates states one by one; the other 57 (from
# llama.cpp's collection, with stop tokens and special tokens listed in index.json) are checked, as
# all are, against inference_oracle by test_inference_match and test_released_templates' tool test.
TABLED = (
    "chatml-openhermes", "command-r", "deepseek-r1-distill-qwen", "deepseek-v3", "falcon-rw-1b-chat",
    "gemma-2-it", "gemma-3-it", "gpt-oss", "granite-3.3-instruct", "hermes-2-pro-tool-use", "internlm2-chat",
    "lfm2", "llama-2-chat", "llama-3.1-instruct", "mistral-7b-instruct-v0.1", "mistral-7b-instruct-v0.3",
    "openchat-3.5", "phi-3-mini-instruct", "phi-4", "qwen2.5-instruct", "qwen3", "smollm3", "vicuna-1.1",
    "zephyr-7b-beta",
)  # fmt: skip
CONTROL_TOKEN = re.compile(
    r"<\|[A-Za-z_]+\|>|<｜[^｜]+｜>|<[a-z_]+_of_turn>|\[/?[A-Z_]+\]|</?(?:think|tool_call|tool_response)>"
)


def template(name: str) -> str:
    text = (HERE / f"{name}.jinja").read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == INDEX[name]["sha256"], f"{name}.jinja was edited"
    return text


@functools.cache
def specials(name: str) -> tuple[str, ...]:
    """The control tokens the template writes that the model's tokenizer has as special tokens:
    listed in index.json where known, else found in the template by their usual shapes."""
    info = INDEX[name]
    found = info.get("specials") or CONTROL_TOKEN.findall(template(name))
    return tuple(dict.fromkeys(t for t in (info["end_of_turn"], *found) if t))


def tokenizer(name: str) -> Any:
    info = INDEX[name]
    return zoo.build(
        "byte_level",
        bos=info["bos_token"],
        eos=info["eos_token"],
        specials=specials(name),
        chat_template=template(name),
        vocab_size=600,
    )


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city."}},
            "required": ["city"],
        },
    },
}

SYSTEM_ONE_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
]
TWO_TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]
TOOL_CALL = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call12345",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"celsius": 21}'},
    {"role": "assistant", "content": "It is 21 degrees in Paris."},
]
REASONING = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "reasoning_content": "France, so Paris.", "content": "The capital is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "reasoning_content": "Italy: Rome.", "content": "Rome, of course."},
]
