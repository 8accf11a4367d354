"""Tool-call and reasoning conversations: OpenAI messages, LLaMA-Factory ShareGPT rows, Arrow nulls."""

from __future__ import annotations

import json

import pytest
import released_templates as rt
import tokenizers_zoo as zoo

from sftrainer.data.formats import Format, normalise_row
from sftrainer.errors import DataError, RowError

QWEN = "qwen2.5-instruct"
CALL_SPAN = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
ANSWER_SPAN = "It is 21 degrees in Paris.<|im_end|>"


def spans(rows: list[dict], tok) -> list[list[str]]:
    return [zoo.trained_spans(tok, r["input_ids"], r["labels"]) for r in rows]


def test_openai_tool_calls_with_null_content_and_json_string_arguments():
    """OpenAI's own shape: content null, arguments a JSON string, tools given as a JSON string."""
    messages = json.loads(json.dumps(rt.TOOL_CALL))
    messages[1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"city": "Paris"})
    row = {"messages": messages, "tools": json.dumps([rt.WEATHER_TOOL])}
    tok = rt.tokenizer(QWEN)
    rows, stats = zoo.prep([row], tok)
    assert stats.kept == 1
    assert spans(rows, tok) == [[CALL_SPAN, ANSWER_SPAN]]  # arguments are not JSON-encoded twice
    assert "Get the current weather" in tok.decode(rows[0]["input_ids"])  # the tools reached the prompt


def test_arrow_null_keys_do_not_reach_the_template():
    """A data set mixing plain and tool-call messages stores every message with every key, nulls
    filled in; Llama-3.1's template tests `'tool_calls' in message` and would break on them."""
    rows = [{"messages": rt.TOOL_CALL, "tools": [rt.WEATHER_TOOL]}, {"messages": rt.TWO_TURNS, "tools": None}]
    tok = rt.tokenizer("llama-3.1-instruct")
    prepared, stats = zoo.prep(rows, tok)
    assert stats.kept == 2
    assert spans(prepared, tok) == [
        [
            '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
            "It is 21 degrees in Paris.<|eot_id|>",
        ],
        ["The capital is Paris.<|eot_id|>", "Rome, of course.<|eot_id|>"],
    ]


LLAMA_FACTORY_ROW = {  # as LLaMA-Factory's ShareGPT tool data writes it
    "conversations": [
        {"from": "human", "value": "What is the weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"celsius": 21}'},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([rt.WEATHER_TOOL["function"]]),
}


def test_llama_factory_sharegpt_tool_rows():
    example = normalise_row(LLAMA_FACTORY_ROW, Format.SHAREGPT, None, True)
    assert [m["role"] for m in example.messages] == ["user", "assistant", "tool", "assistant"]
    call = example.messages[1]["tool_calls"][0]
    assert call == {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert example.messages[1]["content"] is None
    assert example.messages[2]["name"] == "get_weather"  # the result is named after its call
    assert example.tools == [rt.WEATHER_TOOL["function"]]
    tok = rt.tokenizer(QWEN)
    rows, _ = zoo.prep([LLAMA_FACTORY_ROW], tok)
    assert spans(rows, tok) == [[CALL_SPAN, ANSWER_SPAN]]


def test_sharegpt_system_column_is_used():
    row = {
        "conversations": [{"from": m["role"], "value": m["content"]} for m in rt.TWO_TURNS[:2]],
        "system": "Be brief.",
    }
    example = normalise_row(row, Format.SHAREGPT, None, True)
    assert example.messages[0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("key", ["reasoning_content", "thinking", "reasoning"])
def test_reasoning_is_kept_under_any_common_name(key):
    messages = [
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", key: "Italy: Rome.", "content": "Rome."},
    ]
    example = normalise_row({"messages": messages}, Format.MESSAGES, None, True)
    assert example.messages[1]["reasoning_content"] == "Italy: Rome."
    tok = rt.tokenizer("qwen3")
    rows, _ = zoo.prep([{"messages": messages}], tok)
    assert spans(rows, tok) == [["<think>\nItaly: Rome.\n</think>\n\nRome.<|im_end|>"]]
    tok = rt.tokenizer("gpt-oss")  # reads `thinking`
    rows, _ = zoo.prep([{"messages": messages}], tok)
    assert "Italy: Rome." in spans(rows, tok)[0][0]


def test_chat_template_kwargs_from_settings_and_rows():
    messages = rt.TWO_TURNS[:2]
    tok = rt.tokenizer("qwen3")
    off = ["The capital is Paris.<|im_end|>"]
    rows, _ = zoo.prep([{"messages": messages}], tok, chat_template_kwargs={"enable_thinking": False})
    assert spans(rows, tok) == [off]
    rows, _ = zoo.prep(
        [{"messages": messages, "chat_template_kwargs": json.dumps({"enable_thinking": False})}], tok
    )
    assert spans(rows, tok) == [off]


@pytest.mark.parametrize(
    ("message", "field", "words"),
    [
        ({"role": "assistant", "content": None, "tool_calls": "not json"}, "tool_calls", "not valid JSON"),
        (
            {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
            "tool_calls[0]",
            "function name",
        ),
        ({"role": "assistant", "content": None, "tool_calls": []}, "tool_calls", "non-empty list"),
        ({"role": "assistant", "content": None}, "content", "missing"),
        ({"role": "user", "content": 3}, "content", "must be a string"),
    ],
)
def test_bad_tool_call_messages_name_the_field(message, field, words):
    with pytest.raises(RowError) as err:
        normalise_row({"messages": [{"role": "user", "content": "hi"}, message]}, Format.MESSAGES, None, True)
    assert err.value.field.endswith(field) and words in str(err.value)


def test_tool_call_under_a_template_without_tool_support_is_refused_with_the_reason():
    tok = rt.tokenizer("phi-3-mini-instruct")
    with pytest.raises(DataError) as err:
        zoo.prep([{"messages": rt.TOOL_CALL, "tools": [rt.WEATHER_TOOL]}], tok)
    assert "row 1" in str(err.value) and "no tool-call support" in str(err.value)


def test_null_content_rendered_as_empty_text_is_said_once(caplog):
    """Qwen3's template breaks on the null content transformers drops; sftrainer renders it as empty
    text (the tool call is still trained) and says so once, not per row."""
    import logging

    tok = rt.tokenizer("qwen3")
    with caplog.at_level(logging.WARNING, logger="sftrainer.data.render"):
        rows, _ = zoo.prep([{"messages": rt.TOOL_CALL, "tools": [rt.WEATHER_TOOL]}] * 3, tok)
    assert spans(rows, tok)[0][0].startswith("<tool_call>")
    assert caplog.text.count("rendered with empty text") == 1
