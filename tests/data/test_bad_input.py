"""Malformed input: one clear ``DataError`` per case, naming the file / row / field and what to do.

Each case goes through ``load`` then ``prepare``, the path training takes, and must raise
``DataError`` itself (not a traceback from inside datasets, pyarrow or jinja).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers_zoo as zoo
from datasets import Dataset

from sftrainer.data.load import load
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.errors import DataError

GOOD = {"prompt": "What is the capital of France?", "response": "Paris."}
USER = {"role": "user", "content": "Hi"}


def jsonl(*lines: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / "train.jsonl"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return make


def text_file(name: str, content: str) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_text(content, encoding="utf-8")
        return path

    return make


def rows(*items) -> Callable[[Path], list]:
    return lambda tmp: list(items)


def run(source, **settings):
    dataset = load(source)
    return prepare(dataset, zoo.chatml(), DataSettings(max_length=None, **settings))


# (id, source factory, substrings the message must contain)
CASES = [
    (
        "broken jsonl line",
        jsonl(json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "Q", "response": "A"', json.dumps(GOOD)),
        ["train.jsonl:3", "invalid JSON", "Each line of a .jsonl file must be one JSON object"],
    ),
    (
        "jsonl line that is not an object",
        jsonl(json.dumps(GOOD), json.dumps(["Q", "A"])),
        ["train.jsonl:2", "expected a JSON object, got list"],
    ),
    (
        "broken json array",
        text_file("train.json", '[\n  {"prompt": "Q", "response": "A"},\n  {"prompt": "Q" "response": "A"}\n]'),
        ["train.json:3", "invalid JSON"],
    ),
    (
        "misspelled column",
        rows({"prompt": "Q", "respones": "A"}),
        ["['prompt', 'respones']", "'respones' (did you mean 'response'?)", "prompt_response: prompt, response",
         "data.columns"],
    ),
    (
        "missing column",  # (question/answer is a layout sftrainer reads: see test_public_layouts.py)
        rows({"ask": "Q", "reply": "A"}),
        ["['ask', 'reply']", "Known formats", "alpaca: instruction, output", "data.columns"],
    ),
    ("empty list", rows(), ["the list of rows is empty"]),
    ("empty file", text_file("train.jsonl", ""), ["train.jsonl is empty"]),
    ("blank-line file", text_file("train.jsonl", "\n\n  \n"), ["train.jsonl", "has no rows"]),
    ("header-only csv", text_file("train.csv", "prompt,response\n"), ["train.csv", "has no rows"]),
    ("empty json array", text_file("train.json", "[]"), ["train.json", "the JSON array is empty"]),
    ("missing file", lambda tmp: tmp / "nope.jsonl", ["file not found", "nope.jsonl"]),
    ("glob matching nothing", lambda tmp: str(tmp / "*.jsonl"), ["no file matches", "*.jsonl"]),
    ("unsupported file type", text_file("train.txt", "hello"), ["train.txt", "unsupported file type", ".jsonl"]),
    ("non-dict row", rows(GOOD, "What is 2+2?"), ["row 2 is a str, expected a dict"]),
    (
        "empty response",
        rows(GOOD, {"prompt": "Q", "response": ""}),
        ["row 2", "field 'response'", "is empty", "skip_invalid_rows"],
    ),
    (
        "numeric response",
        rows(GOOD, GOOD, {"prompt": "Q", "response": 42}),
        ["row 3", "field 'response'", "must be a string, got int"],
    ),
    (
        "unknown role",
        rows({"messages": [USER, {"role": "bot2", "content": "A"}]}),
        ["row 1", "field 'messages[1].role'", "unknown role 'bot2'", "system, user, assistant, tool"],
    ),
    (
        "empty assistant turn",
        rows({"messages": [USER, {"role": "assistant", "content": "  "}]}),
        ["row 1", "field 'messages[1].content'", "is empty"],
    ),
    (
        "labels of the wrong length",
        rows({"input_ids": [1, 2, 3], "labels": [1, 2]}),
        ["row 1", "field 'labels'", "as long as input_ids (3)"],
    ),
]  # fmt: skip


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_message(tmp_path, make, expected):
    with pytest.raises(DataError) as err:
        run(make(tmp_path))
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    # Raised by sftrainer itself, with no chained traceback from inside a dependency.
    assert Path(str(err.traceback[-1].path)).parent.parent.name == "sftrainer"
    assert err.value.__cause__ is None
    assert err.value.__suppress_context__ or err.value.__context__ is None


def test_many_bad_rows_are_listed_together():
    data = [{"prompt": "Q", "response": ""} for _ in range(8)] + [GOOD]
    with pytest.raises(DataError) as err:
        run(data)
    message = str(err.value)
    assert "8 of 9 rows cannot be used" in message
    assert all(f"row {i}:" in message for i in range(1, 6))
    assert "row 6:" not in message and "... and 3 more" in message


def test_empty_dataset_object():
    with pytest.raises(DataError, match="train data: the data set has no rows"):
        prepare(Dataset.from_dict({"text": []}), zoo.chatml(), DataSettings())


def test_chat_rows_on_a_tokenizer_without_a_template():
    tok = zoo.build("byte_level", bos=None, eos="</s>")
    with pytest.raises(DataError) as err:
        prepare(load([GOOD]), tok, DataSettings())
    assert "the tokenizer has none" in str(err.value) and "pair_template='raw'" in str(err.value)
    # Raw pairs need no template.
    rows, _ = prepare(load([GOOD]), tok, DataSettings(pair_template="raw"))
    assert len(rows) == 1


def test_tokenizer_without_eos():
    tok = zoo.chatml()
    tok.eos_token = None
    with pytest.raises(DataError, match="the tokenizer has no eos_token"):
        prepare(load([{"text": "Hello"}]), tok, DataSettings())


def test_skip_invalid_rows_drops_and_counts():
    data = [
        GOOD,
        {"prompt": "Q", "response": ""},
        {"prompt": "Q", "response": 42},
        {"prompt": "And of Italy?", "response": "Rome."},
    ]
    prepared, stats = run(data, skip_invalid_rows=True)
    assert (stats.rows, stats.kept, stats.dropped_invalid) == (4, 2, 2)
    assert "2 dropped as invalid" in stats.summary(None)
    chatml = zoo.chatml()
    assert [zoo.trained_spans(chatml, r["input_ids"], r["labels"]) for r in prepared] == [
        ["Paris.<|im_end|>"],
        ["Rome.<|im_end|>"],
    ]


def test_skip_invalid_rows_with_every_row_bad():
    with pytest.raises(DataError, match="no row has any token to train on"):
        run([{"prompt": "Q", "response": ""}], skip_invalid_rows=True)


def test_bad_jsonl_row_types_are_checked_per_row(tmp_path):
    path = jsonl(json.dumps(GOOD), json.dumps({"prompt": "Q", "response": ["A"]}))(tmp_path)
    with pytest.raises(DataError) as err:
        run(path)
    assert "row 2: field 'response': must be a string, got list" in str(err.value)
    _, stats = run(path, skip_invalid_rows=True)
    assert (stats.kept, stats.dropped_invalid) == (1, 1)
