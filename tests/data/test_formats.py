"""Format detection and row normalisation (pure functions, no tokenizer)."""

from __future__ import annotations

import pytest

from sftrainer.data.formats import (
    ChatExample,
    Format,
    PairExample,
    TextExample,
    detect_format,
    normalise_row,
    rename_columns,
)
from sftrainer.errors import DataError, RowError


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["text"], Format.TEXT),
        (["prompt", "completion"], Format.PROMPT_COMPLETION),
        (["prompt", "response"], Format.PROMPT_RESPONSE),
        (["system", "prompt", "response"], Format.PROMPT_RESPONSE),
        (["instruction", "input", "output"], Format.ALPACA),
        (["instruction", "output"], Format.ALPACA),
        (["messages"], Format.MESSAGES),
        (["messages", "tools"], Format.MESSAGES),
        (["conversations", "id"], Format.SHAREGPT),
        (["input_ids", "labels"], Format.TOKENIZED),
        (["input_ids", "text"], Format.TOKENIZED),  # already tokenized wins over the raw text
        (["text", "meta", "id"], Format.TEXT),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns, "data.jsonl") is expected


def test_dataset_text_field_prompt_on_pairs_trains_the_answer():
    # The older TRL idiom dataset_text_field="prompt" on prompt/response rows means "format the pair".
    assert detect_format(["prompt", "response"], "d", text_field="prompt") is Format.PROMPT_RESPONSE
    assert detect_format(["prompt", "completion"], "d", text_field="prompt") is Format.PROMPT_COMPLETION
    assert detect_format(["body", "id"], "d", text_field="body") is Format.TEXT


def test_dataset_text_field_missing_names_the_columns():
    with pytest.raises(DataError) as err:
        detect_format(["content", "id"], "train.jsonl", text_field="contnet")
    message = str(err.value)
    assert "train.jsonl" in message
    assert "dataset_text_field='contnet'" in message
    assert "did you mean 'content'?" in message
    assert "['content', 'id']" in message


def test_unknown_columns_list_found_columns_known_formats_and_did_you_mean():
    with pytest.raises(DataError) as err:
        detect_format(["prompt", "respones"], "train.jsonl")
    message = str(err.value)
    assert "train.jsonl" in message
    assert "['prompt', 'respones']" in message  # the columns found
    assert "'respones' (did you mean 'response'?)" in message
    assert "'prompt' (did you mean" not in message  # a correct column is not a misspelling
    for fmt in Format:  # every known format, with its required columns
        assert fmt.value in message
    assert "prompt, response" in message and "instruction, output" in message
    assert "columns" in message and "formatting_func" in message  # what to do about it


def test_unrelated_columns_get_no_false_suggestion():
    with pytest.raises(DataError) as err:
        detect_format(["zzz", "qqq"], "d")
    assert "did you mean" not in str(err.value)
    assert "['zzz', 'qqq']" in str(err.value)


# ---- normalisation ------------------------------------------------------------------------


def test_text_row():
    assert normalise_row({"text": "hello"}, Format.TEXT, None, True) == TextExample("hello")
    assert normalise_row({"body": "hi"}, Format.TEXT, "body", True) == TextExample("hi")


def test_prompt_completion_is_raw_and_prompt_response_is_a_chat_turn():
    row = {"prompt": "2+2=", "completion": "4"}
    assert normalise_row(row, Format.PROMPT_COMPLETION, None, False) == PairExample("2+2=", "4")
    row = {"prompt": "Hi?", "response": "Hello.", "system": "Be brief."}
    assert normalise_row(row, Format.PROMPT_RESPONSE, None, True) == ChatExample(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."},
        ]
    )


def test_alpaca_joins_instruction_and_input():
    row = {"instruction": "Translate.", "input": "good morning", "output": "Bonjour."}
    example = normalise_row(row, Format.ALPACA, None, True)
    assert example.messages == [
        {"role": "user", "content": "Translate.\n\ngood morning"},
        {"role": "assistant", "content": "Bonjour."},
    ]
    no_input = normalise_row({**row, "input": ""}, Format.ALPACA, None, False)
    assert no_input == PairExample("Translate.", "Bonjour.")
    assert normalise_row({**row, "input": None}, Format.ALPACA, None, False) == no_input


def test_sharegpt_speakers_become_roles():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    example = normalise_row(row, Format.SHAREGPT, None, True)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in example.messages] == ["S", "Q", "A"]


def test_message_content_as_text_parts():
    row = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Yo"},
        ]
    }
    assert normalise_row(row, Format.MESSAGES, None, True).messages[0]["content"] == "Hi there"


def test_conversational_prompt_completion_trains_only_the_completion():
    prompt = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    row = {"prompt": prompt, "completion": [{"role": "assistant", "content": "A2"}]}
    example = normalise_row(row, Format.PROMPT_COMPLETION, None, False)
    assert isinstance(example, ChatExample)
    assert example.first_trainable == 3
    assert example.messages[-1] == {"role": "assistant", "content": "A2"}


@pytest.mark.parametrize(
    ("fmt", "row", "field", "problem"),
    [
        (Format.PROMPT_RESPONSE, {"prompt": "Q", "response": ""}, "response", "is empty"),
        (Format.PROMPT_RESPONSE, {"prompt": "Q", "response": "  \n"}, "response", "is empty"),
        (Format.PROMPT_RESPONSE, {"prompt": "Q", "response": 42}, "response", "must be a string, got int"),
        (Format.PROMPT_RESPONSE, {"prompt": None, "response": "A"}, "prompt", "is missing"),
        (Format.PROMPT_COMPLETION, {"prompt": "Q", "completion": 1.5}, "completion", "got float"),
        (Format.ALPACA, {"instruction": "I", "output": ""}, "output", "is empty"),
        (Format.TEXT, {"text": ""}, "text", "is empty"),
        (Format.TEXT, {"text": ["a", "b"]}, "text", "must be a string, got list"),
        (Format.MESSAGES, {"messages": []}, "messages", "non-empty list"),
        (Format.MESSAGES, {"messages": "hi"}, "messages", "non-empty list"),
        (Format.MESSAGES, {"messages": ["hi"]}, "messages[0]", "must be an object"),
        (
            Format.MESSAGES,
            {"messages": [{"role": "user", "content": "Q"}, {"role": "bot2", "content": "A"}]},
            "messages[1].role",
            "unknown role 'bot2'",
        ),
        (
            Format.MESSAGES,
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
            "is empty",
        ),
        (
            Format.MESSAGES,
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 3}]},
            "messages[1].content",
            "must be a string, got int",
        ),
        (
            Format.SHAREGPT,
            {"conversations": [{"from": "humman", "value": "Q"}]},
            "conversations[0].from",
            "unknown role 'humman'",
        ),
    ],
)
def test_row_errors_name_the_field(fmt, row, field, problem):
    with pytest.raises(RowError) as err:
        normalise_row(row, fmt, None, True)
    assert err.value.field == field
    assert problem in str(err.value)
    assert f"field '{field}'" in str(err.value)


def test_unknown_role_lists_the_known_roles():
    row = {"messages": [{"role": "bot2", "content": "A"}]}
    with pytest.raises(RowError) as err:
        normalise_row(row, Format.MESSAGES, None, True)
    message = str(err.value)
    assert "system, user, assistant, tool" in message
    assert "human" in message and "gpt" in message  # accepted aliases are listed too


def test_empty_user_message_is_allowed_but_empty_assistant_is_not():
    ok = {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "A"}]}
    assert normalise_row(ok, Format.MESSAGES, None, True).messages[0]["content"] == ""


def test_rename_columns_checks_both_sides():
    assert rename_columns(["q", "a"], {"q": "prompt", "a": "response"}, "d") == {
        "q": "prompt",
        "a": "response",
    }
    with pytest.raises(DataError) as err:
        rename_columns(["question", "answer"], {"questoin": "prompt"}, "train.csv")
    assert "train.csv" in str(err.value) and "did you mean 'question'?" in str(err.value)
    with pytest.raises(DataError) as err:
        rename_columns(["q"], {"q": "promt"}, "d")
    assert "did you mean 'prompt'?" in str(err.value)
