"""Malformed input: one clear ``DataError`` per case, naming the file / row / field and what to do.

Each case of ``CASES`` goes through ``load`` then ``prepare`` (and reads a streamed result), the path
training takes, and must raise ``DataError`` (``ConfigError`` for a setting) itself, not a traceback
from inside datasets, pyarrow or jinja.

Deliberately accepted, each asserted and reported in the tests below the table:
- consecutive same-role turns: rendered as given by the chat template (not merged), counted in
  ``PrepareStats.same_role_rows`` and logged; a template that requires alternation refuses the row
  (a table case);
- rows 100x longer than max_length: truncated and counted (``truncated``), logged as a warning; rows
  whose prompt alone fills max_length are dropped and counted with the reason (``dropped_empty``);
  when that leaves nothing the run stops (a table case);
- ``skip_invalid_rows=true``: bad rows (mixed formats, nulls, wrong types) dropped and counted.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import released_templates as rt
import tokenizers_zoo as zoo
from datasets import Dataset, IterableDataset

import sftrainer
from sftrainer.data.load import load
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.errors import ConfigError, DataError, SFTrainerError
from sftrainer.run_config import build_config

GOOD = {"prompt": "What is the capital of France?", "response": "Paris."}
USER = {"role": "user", "content": "Hi"}
ANSWER = {"role": "assistant", "content": "Hello."}


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


def binary_file(name: str, content: bytes) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        path = tmp / name
        path.write_bytes(content)
        return path

    return make


def rows(*items) -> Callable[[Path], list]:
    return lambda tmp: list(items)


def empty_dir(tmp: Path) -> Path:
    (tmp / "data" / "notes").mkdir(parents=True)
    (tmp / "data" / "notes" / "README.md").write_text("no data here")
    return tmp / "data"


def stream_breaking_at(n: int) -> Callable[[Path], IterableDataset]:
    """A streamed source whose reader fails after ``n`` rows (a truncated download, a lost connection)."""

    def gen():
        for i in range(2 * n):
            if i == n:
                raise OSError("Connection reset by peer")
            yield GOOD

    return lambda tmp: IterableDataset.from_generator(gen)


def streamed_jsonl(tmp: Path) -> IterableDataset:
    path = jsonl(json.dumps(GOOD), '{"prompt": "Q", "resp', json.dumps(GOOD))(tmp)
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)


def mixture_config(**source) -> Callable[[Path], object]:
    def make(tmp: Path):
        path = jsonl(json.dumps(GOOD))(tmp)
        return build_config({"data": {"train": [{"path": str(path), **source}, {"path": str(path)}]}})

    return make


def run(source, tokenizer=None, **settings):
    dataset = load(source)
    settings.setdefault("max_length", None)
    prepared, stats = prepare(dataset, tokenizer or zoo.chatml(), DataSettings(**settings))
    if isinstance(prepared, IterableDataset):  # a stream is read while training
        list(prepared)
    return prepared, stats


def case(name: str, make: Callable, expected: list[str], **options):
    return pytest.param(make, expected, options, id=name)


ALTERNATING = "llama-2-chat"  # a released template that raises "roles must alternate"
TOOL_TURN = {
    "role": "assistant",
    "content": None,
    "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
}
LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 200  # 5,001 tokens: 100x max_length=50


# case(id, source factory, substrings the message must contain, tokenizer=, error=, **DataSettings)
CASES = [
    case(
        "broken jsonl line",
        jsonl(json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "Q", "response": "A"', json.dumps(GOOD)),
        ["train.jsonl:3", "invalid JSON", "Each line of a .jsonl file must be one JSON object"],
    ),
    case(
        "jsonl line that is not an object",
        jsonl(json.dumps(GOOD), json.dumps(["Q", "A"])),
        ["train.jsonl:2", "expected a JSON object, got list"],
    ),
    case(
        "broken json array",
        text_file("train.json", '[\n  {"prompt": "Q", "response": "A"},\n  {"prompt": "Q" "response": "A"}\n]'),
        ["train.json:3", "invalid JSON"],
    ),
    case(
        "misspelled column",
        rows({"prompt": "Q", "respones": "A"}),
        ["['prompt', 'respones']", "'respones' (did you mean 'response'?)", "prompt_response: prompt, response",
         "data.columns"],
    ),
    case(
        "missing column",  # (question/answer is a layout sftrainer reads: see test_public_layouts.py)
        rows({"ask": "Q", "reply": "A"}),
        ["['ask', 'reply']", "Known formats", "alpaca: instruction, output", "data.columns"],
    ),
    case("empty list", rows(), ["the list of rows is empty"]),
    case("empty file", text_file("train.jsonl", ""), ["train.jsonl is empty"]),
    case("blank-line file", text_file("train.jsonl", "\n\n  \n"), ["train.jsonl", "has no rows"]),
    case("header-only csv", text_file("train.csv", "prompt,response\n"), ["train.csv", "has no rows"]),
    case("empty json array", text_file("train.json", "[]"), ["train.json", "the JSON array is empty"]),
    case("missing file", lambda tmp: tmp / "nope.jsonl", ["file not found", "nope.jsonl"]),
    case("glob matching nothing", lambda tmp: str(tmp / "*.jsonl"), ["no file matches", "*.jsonl"]),
    case("unsupported file type", text_file("train.txt", "hello"), ["train.txt", "unsupported file type", ".jsonl"]),
    case("non-dict row", rows(GOOD, "What is 2+2?"), ["row 2 is a str, expected a dict"]),
    case(
        "empty response",
        rows(GOOD, {"prompt": "Q", "response": ""}),
        ["row 2", "field 'response'", "is empty", "skip_invalid_rows"],
    ),
    case(
        "numeric response",
        rows(GOOD, GOOD, {"prompt": "Q", "response": 42}),
        ["row 3", "field 'response'", "must be a string, got int"],
    ),
    case(
        "unknown role",
        rows({"messages": [USER, {"role": "bot2", "content": "A"}]}),
        ["row 1", "field 'messages[1].role'", "unknown role 'bot2'", "system, user, assistant, tool"],
    ),
    case(
        "empty assistant turn",
        rows({"messages": [USER, {"role": "assistant", "content": "  "}]}),
        ["row 1", "field 'messages[1].content'", "is empty"],
    ),
    case(
        "labels of the wrong length",
        rows({"input_ids": [1, 2, 3], "labels": [1, 2]}),
        ["row 1", "field 'labels'", "as long as input_ids (3)"],
    ),
    case(
        "invalid utf-8 in jsonl",
        binary_file("train.jsonl", json.dumps(GOOD).encode() + b'\n{"prompt": "caf\xe9", "response": "A"}\n'),
        ["train.jsonl:2", "not valid UTF-8", "byte 0xe9 at column 16", "Save the file as UTF-8"],
    ),
    case(
        "invalid utf-8 in csv",
        binary_file("train.csv", b"prompt,response\nQ,A\ncaf\xe9,A\n"),
        ["train.csv:3", "not valid UTF-8", "Save the file as UTF-8"],
    ),
    case(
        "csv with a duplicate header",
        text_file("train.csv", "prompt,response,response\nQ,A,B\n"),
        ["train.csv:1", "names column 'response' twice (columns 2 and 3)", "Rename or remove one"],
    ),
    case(
        "csv header cell without a name",
        text_file("train.csv", "prompt,,response\nQ,x,A\n"),
        ["train.csv:1", "column 2 of the header has no name", "name it, or remove the column"],
    ),
    case(
        "csv with no header line",
        text_file("train.csv", "What is 2+2?,Four.\nWhat is 3+3?,Six.\n"),
        ["['What is 2+2?', 'Four.']", "a CSV file's first line must be a header", "prompt,response"],
    ),
    case(
        "csv row with more fields than the header",
        text_file("train.csv", "prompt,response\nQ,A\nQ,A, and more\n"),
        ["train.csv:3", "3 fields, but the header names 2 (prompt, response)", "Quote values that hold a comma"],
    ),
    case(
        "mixed formats in one file",
        jsonl(json.dumps({"messages": [USER, ANSWER]}), "", json.dumps({"messages": [USER, ANSWER]}), json.dumps(GOOD)),
        ["train.jsonl): the rows mix data formats", "messages (messages): 2 rows, the first at ",
         "train.jsonl:1\n", "prompt_response (prompt, response): 1 row, the first at ", "train.jsonl:4\n",
         "read in one format (here messages", "list the files as sources of a mixture",
         "skip_invalid_rows=true to train on the messages rows only"],
    ),
    case(
        "mixed formats in a csv file",
        text_file("train.csv", "text,prompt,response\nHello there.,,\n,Q,A\n"),
        ["train.csv): the rows mix data formats", "text (text): 1 row, the first at ", "train.csv:2\n",
         "prompt_response (prompt, response): 1 row, the first at ", "train.csv:3\n"],
    ),
    case(
        "mixed formats in python rows",
        rows(GOOD, {"messages": [USER, ANSWER]}, GOOD),
        ["train data: the rows mix data formats", "messages (messages): 1 row, the first at row 2",
         "prompt_response (prompt, response): 2 rows, the first at row 1"],
    ),
    case(
        "pre-tokenized rows mixed with text rows",
        rows({"input_ids": [1, 2, 3]}, {"text": "Hello."}),
        ["the rows mix data formats", "tokenized (input_ids): 1 row, the first at row 1",
         "text (text): 1 row, the first at row 2"],
    ),
    case(
        "file whose format cannot be told",
        jsonl(json.dumps({"ask": "Q", "reply": "A"})),
        ["train data (", "train.jsonl): cannot tell the data format from the columns ['ask', 'reply']",
         "Known formats", "`columns: {ask: prompt, reply: response}`", "formatting_func"],
    ),
    case(
        "file with a misspelled column",
        jsonl(json.dumps({"prompt": "Q", "respones": "A"})),
        ["train.jsonl): cannot tell the data format", "'respones' (did you mean 'response'?)",
         "It could be: prompt_completion (missing completion); prompt_response (missing response)",
         "`columns: {respones: response}`"],
    ),
    case(
        "bad row of a file, after a blank line",
        jsonl(json.dumps(GOOD), "", json.dumps({"prompt": "Q", "response": ""})),
        ["train.jsonl): 1 of 2 rows cannot be used", "row 2 (", "train.jsonl:3): field 'response': is empty"],
    ),
    case(
        "null value",
        jsonl(json.dumps(GOOD), json.dumps({"prompt": "Q", "response": None})),
        ["row 2", "field 'response'", "is missing (null"],
    ),
    case(
        "NaN in jsonl",
        text_file("train.jsonl", json.dumps(GOOD) + '\n{"prompt": NaN, "response": "A"}\n'),
        ["row 2", "field 'prompt'", "is missing (null; NaN"],
    ),
    case(
        "empty csv cell",
        text_file("train.csv", "prompt,response\nQ,A\nQ,\n"),
        ["row 2", "field 'response'", "an empty CSV cell"],
    ),
    case(
        "NaN in python rows",
        rows(GOOD, {"prompt": "Q", "response": float("nan")}),
        ["row 2", "field 'response'", "is missing (null; NaN"],
    ),
    case(
        "nested object where a string is expected",
        rows(GOOD, {"prompt": {"text": "Q", "lang": "en"}, "response": "A"}),
        ["row 2", "field 'prompt'", "must be a string, got dict"],
    ),
    case(
        "nested object as message content",
        rows({"messages": [{"role": "user", "content": {"text": "Hi"}}, ANSWER]}),
        ["row 1", "field 'messages[0].content'", "must be a string, got dict"],
    ),
    case(
        "conversation with no assistant turn",
        rows({"messages": [USER, ANSWER]}, {"messages": [USER]}),
        ["row 2", "field 'messages'", "has no assistant turn to train on (roles: user)", "Add the answer",
         "skip_invalid_rows=true", "train_on='all'"],
    ),
    case(  # used to give no row at all, silently: split_turns made one row per assistant turn
        "conversation with no assistant turn, split_turns",
        rows({"messages": [USER, ANSWER]}, {"messages": [USER]}),
        ["row 2", "has no assistant turn to train on"],
        split_turns=True,
    ),
    case(
        "system-only conversation",
        rows({"messages": [{"role": "system", "content": "Be terse."}]}),
        ["row 1", "field 'messages'", "has no assistant turn to train on (roles: system)"],
    ),
    case(
        "sharegpt conversation ending on the user",
        rows({"conversations": [{"from": "human", "value": "Hi"}]}),
        ["row 1", "field 'conversations'", "has no assistant turn to train on (roles: user)"],
    ),
    case(
        "consecutive same-role turns, template requires alternation",
        rows({"messages": [USER, USER, ANSWER]}),
        ["row 1", "field 'messages'", "the chat template rejected this conversation", "alternate"],
        tokenizer=lambda: rt.tokenizer(ALTERNATING),
    ),
    case(
        "unknown role spelled close to a known one",
        rows({"messages": [{"role": "usr", "content": "Hi"}, ANSWER]}),
        ["row 1", "field 'messages[0].role'", "unknown role 'usr' (did you mean 'user'?)"],
    ),
    case(
        "tool call under a template that cannot render it",
        rows({"messages": [USER, TOOL_TURN, {"role": "tool", "content": "sunny"}, ANSWER]}),
        ["row 1", "field 'messages[1]'", "does not render this turn's tool call (get_weather)",
         "Use a chat_template that renders `tool_calls`"],
    ),
    case(
        "prompt 100x longer than max_length",
        rows({"prompt": LONG_PROMPT, "response": "Yes."}, {"prompt": LONG_PROMPT, "response": "No."}),
        ["no row has any token to train on", "2 dropped: no trained token left",
         "raise it or set truncation_mode='keep_end'"],
        max_length=50,
    ),
    case("directory with no data files", empty_dir, ["directory", "has no .json, .jsonl, .csv, .parquet files"]),
    case(
        "data.columns naming a column that does not exist",
        rows(GOOD),
        ["data.columns maps ['questoin']", "no such column", "Columns found: ['prompt', 'response']"],
        columns={"questoin": "prompt"},
    ),
    case(
        "data.columns mapping to a name sftrainer does not read",
        rows({"question": "Q", "answer": "A"}),
        ["data.columns maps to ['promt']", "(did you mean 'prompt'?)"],
        columns={"question": "promt", "answer": "response"},
    ),
    case(
        "mixture weight that is negative",
        mixture_config(weight=-1),
        ["data.train[0].weight: must be > 0, got -1", "remove the source to leave it out"],
        error=ConfigError,
    ),
    case(
        "mixture source with both weight and rows",
        mixture_config(weight=2, rows=10),
        ["data.train[0]: set weight (a share of the mix) or rows (a number of rows), not both"],
        error=ConfigError,
    ),
    case(
        "streamed source that breaks halfway",
        stream_breaking_at(40),
        ["train data", "reading the streamed data failed after 40 rows", "OSError: Connection reset by peer",
         "fix or download the file again", "loading it without streaming"],
    ),
    case(
        "streamed jsonl file with a broken line",
        streamed_jsonl,
        ["(files: ", "train.jsonl)", "reading the streamed data failed"],
    ),
]  # fmt: skip


def test_the_table_has_at_least_30_distinct_cases():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize(("make", "expected", "options"), CASES)
def test_bad_input_message(tmp_path, make, expected, options):
    options = dict(options)
    error = options.pop("error", DataError)
    tokenizer = options.pop("tokenizer", zoo.chatml)()
    with pytest.raises(SFTrainerError) as err:
        run(make(tmp_path), tokenizer, **options)
    assert type(err.value) is error or isinstance(err.value, error)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in:\n{message}"
    # Raised by sftrainer itself, with no chained traceback from inside a dependency.
    assert Path(sftrainer.__file__).parent in Path(str(err.traceback[-1].path)).parents
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
    assert f"row 2 ({path}:2): field 'response': must be a string, got list" in str(err.value)
    _, stats = run(path, skip_invalid_rows=True)
    assert (stats.kept, stats.dropped_invalid) == (1, 1)


# ---- accepted on purpose, and reported ---------------------------------------------------------


def test_consecutive_same_role_turns_are_rendered_as_given_and_reported(caplog):
    chatml = zoo.chatml()
    data = [
        {"messages": [USER, {"role": "user", "content": "Are you there?"}, ANSWER]},
        {"messages": [USER, ANSWER]},
    ]
    with caplog.at_level(logging.INFO, logger="sftrainer"):
        prepared, stats = run(data, chatml)
    assert (stats.kept, stats.same_role_rows) == (2, 1)
    text = chatml.decode(prepared[0]["input_ids"])
    assert text.count("<|im_start|>user") == 2  # not merged
    assert zoo.trained_spans(chatml, prepared[0]["input_ids"], prepared[0]["labels"]) == ["Hello.<|im_end|>"]
    assert "1 conversation(s) have two consecutive turns of the same role" in caplog.text


def test_rows_100x_longer_than_max_length_are_truncated_counted_and_reported(caplog):
    long_answer = {"prompt": "Q", "response": LONG_PROMPT}  # 5,000 tokens at max_length=50
    long_prompt = {"prompt": LONG_PROMPT, "response": "Yes."}  # nothing of the answer fits
    with caplog.at_level(logging.WARNING, logger="sftrainer"):
        prepared, stats = run([long_answer, long_prompt, long_answer], max_length=50)
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_empty) == (3, 2, 2, 1)
    assert all(len(row["input_ids"]) == 50 for row in prepared)
    assert "2 truncated to max_length=50" in caplog.text
    assert "1 dropped: no trained token left" in caplog.text and "truncation_mode='keep_end'" in caplog.text


def test_skip_invalid_rows_counts_mixed_formats_and_nulls():
    chat = {"messages": [USER, ANSWER]}
    data = [chat, GOOD, chat, {"messages": [USER, {"role": "assistant", "content": None}]}]
    _, stats = run(data, skip_invalid_rows=True)
    assert (stats.rows, stats.kept, stats.dropped_invalid) == (4, 2, 2)


def test_mixed_formats_split_off_or_sampled_from_a_file_are_named_by_their_lines(tmp_path):
    """The CLI splits eval_split off (and renames data.columns) before preparing, and a mixture
    prepares a sample: the first row of each format is still named by its line in the file."""
    from sftrainer.data.mixture import Mixture, MixtureSource, prepare_mixture
    from sftrainer.sources import resolve_data

    chat = json.dumps({"messages": [USER, ANSWER]})
    path = jsonl(*[chat] * 6, *[json.dumps({"question": "Q", "response": "A"})] * 6)(tmp_path)
    cfg = build_config({"data": {"train": str(path), "eval_split": 0.25, "columns": {"question": "prompt"}}})
    train, _ = resolve_data(cfg)
    mixture = Mixture(
        [MixtureSource(str(path), rows=8, columns={"question": "prompt"}), MixtureSource([GOOD])]
    )
    for prepared in (
        lambda: prepare(train, zoo.chatml(), DataSettings()),
        lambda: prepare_mixture(mixture, zoo.chatml(), DataSettings()),
    ):
        with pytest.raises(DataError) as err:
            prepared()
        message = str(err.value)
        assert "the rows mix data formats" in message and str(path) in message.splitlines()[0]
        chat_line, pair_line = (
            int(n) for n in re.findall(rf"the first at {re.escape(str(path))}:(\d+)", message)
        )
        assert chat_line <= 6 < pair_line  # a messages line, then a prompt/response line
