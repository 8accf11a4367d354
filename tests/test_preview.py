"""``sftrainer data``: the preview of prepared rows (sftrainer/preview.py) and the command end to end.

Rendered rows are checked against the labels (the text inside the markers is exactly the trained
tokens), the histogram against the kept rows, the PNG by decoding it, the warnings on crafted data.
"""

from __future__ import annotations

import importlib
import json
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sftrainer import SFTConfig
from sftrainer.cli import main
from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.load import load
from sftrainer.data.stats import count_duplicates, row_arrays
from sftrainer.preview import (
    ANSI_RESET,
    ANSI_TRAINED,
    ASCII_MARKERS,
    MARKERS,
    format_histogram,
    length_histogram,
    markers_for,
    prepare_for_preview,
    render_row,
    template_source,
)

pytestmark = pytest.mark.slow

CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Reverse the words: cat dog"},
            {"role": "assistant", "content": "dog cat"},
            {"role": "user", "content": "Count the words: sun sun"},
            {"role": "assistant", "content": "2"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Last word of: apple berry"},
            {"role": "assistant", "content": "berry"},
        ]
    },
]
PAIRS = [
    {"prompt": "Reverse the words: cat dog", "response": "dog cat"},
    {"prompt": "Sort the words: owl egg", "response": "egg owl"},
    {"prompt": "Count the words: sun sun sun sun sun sun sun sun", "response": "8"},
]


def args(tmp_path: Path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_length=64, report_to="none")
    values.update(overrides)
    return SFTConfig(**values)


def spans_from_labels(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    """Each run of consecutive trained tokens, decoded: what the markers must hold."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(ids, labels):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(token)
        previous = trained
    return [tokenizer.decode(run) for run in runs]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- rendered rows -------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [CHAT_ROWS, PAIRS], ids=["multi-turn", "pairs"])
def test_markers_hold_exactly_the_trained_tokens(tmp_path, tokenizer, rows):
    prepared, stats, _ = prepare_for_preview(load(rows), tokenizer, args(tmp_path))
    arrays = row_arrays(prepared)
    assert arrays.lengths.size == stats.kept == len(rows)
    for k in range(len(rows)):
        a, b = arrays.offsets[k], arrays.offsets[k + 1]
        ids, labels = arrays.ids[a:b].tolist(), arrays.labels[a:b].tolist()
        expected = spans_from_labels(tokenizer, ids, labels)
        assert expected and all(span.endswith("<|im_end|>") for span in expected)

        marked = render_row(ids, labels, tokenizer, markers=MARKERS)
        assert re.findall("⟦(.*?)⟧", marked, flags=re.S) == expected
        assert marked.replace("⟦", "").replace("⟧", "") == tokenizer.decode(ids)  # nothing else changed

        coloured = render_row(ids, labels, tokenizer, colour=True)
        pattern = re.escape(ANSI_TRAINED) + "(.*?)" + re.escape(ANSI_RESET)
        assert re.findall(pattern, coloured, flags=re.S) == expected
    if rows is CHAT_ROWS:  # both assistant turns of the first conversation are marked, apart
        first = render_row(
            arrays.ids[: arrays.offsets[1]].tolist(), arrays.labels[: arrays.offsets[1]].tolist(), tokenizer
        )
        assert re.findall("⟦(.*?)⟧", first, flags=re.S) == ["dog cat<|im_end|>", "2<|im_end|>"]


def test_long_rows_are_cut_with_a_count(tokenizer):
    ids = tokenizer("word " * 50, add_special_tokens=False)["input_ids"]
    text = render_row(ids, ids, tokenizer, limit=10)
    assert text.endswith(f" ... ({len(ids) - 10} more tokens)")


def test_markers_fall_back_to_ascii_where_the_encoding_cannot_write_them():
    assert markers_for("utf-8") == MARKERS
    assert markers_for("ascii") == ASCII_MARKERS
    assert markers_for(None) == ASCII_MARKERS


def test_packed_rows_are_split_back_into_their_rows(tmp_path, tokenizer):
    unpacked, _, _ = prepare_for_preview(load(PAIRS), tokenizer, args(tmp_path))
    _, _, pack = prepare_for_preview(load(PAIRS), tokenizer, args(tmp_path, packing=True, max_length=128))
    assert pack is not None and pack.rows == 3 and pack.sequences == 1
    from sftrainer.data.pack import pack_dataset

    packed, _ = pack_dataset(unpacked, 128)
    arrays = row_arrays(packed)
    assert sorted(arrays.lengths.tolist()) == sorted(row_arrays(unpacked).lengths.tolist())


# ---- counts and the histogram --------------------------------------------------------------------


def test_histogram_counts_sum_to_the_kept_rows(tmp_path, tokenizer):
    """Rows of every length up to past max_length: some truncated, some dropped (the prompt alone
    fills max_length, so no trained token is left); the histogram counts exactly the kept ones."""
    rows = [{"prompt": "Count the words: " + "sun " * n, "response": str(n)} for n in range(1, 40)]
    prepared, stats, _ = prepare_for_preview(load(rows), tokenizer, args(tmp_path, max_length=32))
    lengths = row_arrays(prepared).lengths
    hist = length_histogram(lengths)
    assert stats.truncated > 0 and stats.dropped_empty > 0 and 0 < stats.kept < len(rows)
    assert hist.total == stats.kept == lengths.size
    for k, count in enumerate(hist.counts):  # each bin holds exactly the rows in its range
        assert count == int(((lengths >= hist.edges[k]) & (lengths < hist.edges[k + 1])).sum())
    assert len(hist.counts) <= 12 and lengths.max() <= 32
    lines = format_histogram(hist).splitlines()
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == hist.counts


def test_histogram_of_dropped_rows_counts_only_the_kept(tmp_path, tokenizer):
    rows = [{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, 6, 7, 8]}] * 3 + [
        {"input_ids": [5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX]}
    ] * 2
    prepared, stats, _ = prepare_for_preview(load(rows), tokenizer, args(tmp_path))
    assert (stats.rows, stats.kept, stats.dropped_empty) == (5, 3, 2)
    assert length_histogram(row_arrays(prepared).lengths).total == 3


def test_duplicates_are_counted():
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": "c"}] * 3 + [
        {"prompt": "z", "response": "b"}
    ]
    assert count_duplicates(load(rows)) == 4
    assert count_duplicates(load(PAIRS)) == 0


def test_template_source_names_where_it_came_from():
    assert template_source("{{x}}", None, None, "m") == "the tokenizer's own (m)"
    assert template_source(None, None, None, "m").startswith("sftrainer's built-in default")
    assert template_source("{{x}}", "t.jinja", None, "m") == "the chat_template setting (t.jinja)"
    assert template_source("{{x}}", "{% for m in messages %}", None, "m").endswith(
        "(Jinja text in the config)"
    )
    assert template_source(None, None, "org/model", "m") == "chat_template_path (org/model)"


# ---- the command ----------------------------------------------------------------------------------


def read_png(path: Path) -> tuple[int, int, bytes]:
    """(width, height, raw scanlines) of an 8-bit RGB PNG, checking its signature and every CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (1 + 3 * width)
    return width, height, raw


def test_data_command_on_a_jsonl_file(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", CHAT_ROWS * 2 + [{"messages": [
        {"role": "user", "content": "Sort the words: owl egg"}, {"role": "assistant", "content": "egg owl"}]}])  # fmt: skip
    plot = tmp_path / "lengths.png"
    code = main(
        ["data", str(data), "--model", "builtin", "--rows", "2", "--plot", str(plot), "max_length=96"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"train data: {data}" in out
    assert "format: messages, chat template; columns: messages" in out
    assert "rows: 5 read, 5 kept, 0 truncated to max_length=96" in out
    assert "chat template: the tokenizer's own (builtin)" in out
    assert out.count("--- row ") == 2  # --rows 2
    assert "⟦dog cat<|im_end|>⟧" in out  # not a terminal: markers, not colour
    assert "\033[" not in out
    assert (
        "Pre-flight:" in out and "optimizer steps: 3 (1 per epoch x 3 epochs; 5 sequences, 8 per step)" in out
    )
    assert "warning: 2 rows repeat an earlier row exactly" in out
    width, height, raw = read_png(plot)
    assert (width, height) == (640, 320)
    assert len(set(raw)) > 3  # bars and text were drawn, not a blank image


def test_data_command_reads_a_config_with_overrides(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model:\n  name_or_path: builtin\ndata:\n  train: {data}\n  eval_split: 0.25\n"
        "lora:\n  r: 4\nlearning_rate: 2.0e-4\nper_device_train_batch_size: 2\nmax_length: 32\n"
    )
    code = main(["data", str(config), "--rows", "0", "gradient_accumulation_steps=3", "num_train_epochs=2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "train data:" in out and "eval data: 0.25 of the train data (data.eval_split)" in out
    assert "rows: 9 read, 9 kept" in out and "rows: 3 read, 3 kept" in out
    assert "--- row" not in out
    assert "optimizer steps: 4 (2 per epoch x 2 epochs; 9 sequences, 6 per step)" in out


def test_data_command_needs_a_model_for_a_data_file(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert main(["data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "sftrainer: error: sftrainer data" in err and "give --model" in err


def test_histogram_png_marks_max_length(tmp_path):
    from sftrainer.preview import write_histogram_png

    hist = length_histogram(np.array([3, 5, 9, 9, 12, 20]))
    path = tmp_path / "h.png"
    write_histogram_png(str(path), hist, max_length=16)
    _, _, raw = read_png(path)
    assert bytes((200, 60, 40)) in raw  # the max_length line is drawn


def test_data_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("CONFIG.yaml | DATA --model M", "--rows N", "--plot FILE", "--probe", "⟦", "pre-flight"):
        assert text in out, f"{text!r} missing from data --help"


def test_data_command_shows_the_mix_of_a_mixture(tmp_path, capsys, tiny_model_dir):
    chats = write_jsonl(tmp_path / "chats.jsonl", CHAT_ROWS)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 5)
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"model:\n  name_or_path: builtin\ndata:\n  train:\n    - path: {chats}\n    - path: {pairs}\n"
        "      rows: 4\nmax_length: 128\n"
    )
    assert main(["data", str(config), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert f"train data: mixture of {chats}, {pairs}" in out
    assert "rows: 6 read, 6 kept" in out
    table = out[out.index("  sources:") :].splitlines()[1:5]
    assert table[0].split() == ["source", "rows", "in", "rows", "used", "dropped", "/", "repeated", "tools",
                                "tool", "calls", "reasoning"]  # fmt: skip
    assert table[1].split() == [str(chats), "2", "2", "all,", "once", "0", "0", "0"]
    assert table[2].split()[:5] == [str(pairs), "15", "4", "11", "dropped"]
    assert table[3].split() == ["total", "17", "6", "0", "0", "0"]
    assert "optimizer steps: 3 (1 per epoch x 3 epochs; 6 sequences, 8 per step)" in out


TOOL = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}  # fmt: skip
QWEN3 = Path(__file__).parent / "data" / "chat_templates" / "qwen3.jinja"  # renders tool calls and reasoning


def tool_row(i: int) -> dict:
    return {"tools": [TOOL], "message_tree_id": f"t{i}", "messages": [
        {"role": "user", "content": f"What is {i} plus 1?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "add", "arguments": {"a": i, "b": 1}}}]},
        {"role": "tool", "content": str(i + 1)},
        {"role": "assistant", "content": f"{i + 1}", "reasoning_content": "one more"}]}  # fmt: skip


def test_data_command_tables_how_a_mixture_uses_each_source(tmp_path, capsys, tiny_model_dir):
    """100 of 300 tool rows left out, a pair file repeated twice: on stdout, not only in the log."""
    tools = write_jsonl(tmp_path / "tools.jsonl", [tool_row(i) for i in range(300)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{**PAIRS[i % 3], "lang": "en"} for i in range(50)])
    config = tmp_path / "mix.yaml"
    config.write_text(
        f"model:\n  name_or_path: builtin\ndata:\n  train:\n    - path: {tools}\n      rows: 200\n"
        f"    - path: {pairs}\n      rows: 100\nmax_length: 1024\nchat_template_path: {QWEN3}\n"
    )
    assert main(["data", str(config), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("  sources:") :].splitlines()[1:7]
    assert lines[1].split() == [str(tools), "300", "200", "100", "dropped", "(a", "sample", "of", "200)",
                                "200", "200", "200"]  # fmt: skip
    assert lines[2].split() == [str(pairs), "50", "100", "repeated,", "each", "row", "~2.0x", "0", "0", "0"]
    assert lines[3].split() == ["total", "350", "300", "200", "200", "200"]
    assert lines[4].strip() == f"{tools}: ignored (not read): message_tree_id"
    assert lines[5].strip() == f"{pairs}: ignored (not read): lang"


def test_data_command_lists_a_column_it_does_not_read_as_ignored(tmp_path, capsys, tiny_model_dir):
    data = write_jsonl(tmp_path / "tools.jsonl", [tool_row(i) for i in range(4)])
    code = main(["data", str(data), "--model", "builtin", "--rows", "0", f"chat_template_path={QWEN3}"])
    out = capsys.readouterr().out
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("  format:"))
    assert line.endswith("columns: tools, messages (read as named); ignored (not read): message_tree_id")
    assert "  content: 4 with tools, 4 with tool calls, 4 with reasoning (of 4 rows)" in out


def test_data_command_describes_a_stream_by_its_first_rows(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from sftrainer import preview

    monkeypatch.setattr(preview, "STREAM_PREVIEW_ROWS", 4)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS * 4)
    code = main(
        ["data", str(data), "--model", "builtin", "--rows", "1", "data.streaming=true", "max_steps=2"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"train data: {data} (streamed: its first 4 rows, not the whole stream)" in out
    assert "rows: 4 read, 4 kept" in out and out.count("--- row ") == 1


# ---- the preview's rows are the trained rows ------------------------------------------------------


class _Stop(Exception):
    """Raised where training would start: the trainer is built, its data prepared."""


def _rows_of(dataset) -> list[tuple[bytes, bytes]]:
    """Each row (packed sequences split back) as the bytes of its input_ids and labels."""
    arrays = row_arrays(dataset)
    bounds = zip(arrays.offsets[:-1], arrays.offsets[1:])
    return [(arrays.ids[a:b].tobytes(), arrays.labels[a:b].tobytes()) for a, b in bounds]


def _trained_and_previewed(raw: dict, run: Path, monkeypatch) -> tuple[Any, Any]:
    """The train rows ``train(cfg)`` builds its trainer with, and the rows ``sftrainer data`` prepared."""
    from sftrainer import preview
    from sftrainer.run_config import build_config
    from sftrainer.trainer import SFTTrainer

    train = importlib.import_module("sftrainer.train")  # the module (sftrainer.train is also the function)
    cfg = build_config({**raw, "output_dir": str(run), "report_to": "none"})
    seen: dict[str, Any] = {}

    class Captured(SFTTrainer):
        def train(self, *args, **kwargs):
            seen["trained"] = self.train_dataset
            raise _Stop

    monkeypatch.setattr(train, "SFTTrainer", Captured)
    with pytest.raises(_Stop):
        train.train(cfg)
    prepare = preview._prepare_with_sources

    def spy(dataset, tokenizer, args, name, *rest):
        out = prepare(dataset, tokenizer, args, name, *rest)
        seen.setdefault(name, out[0])
        return out

    monkeypatch.setattr(preview, "_prepare_with_sources", spy)
    preview.preview_run(cfg)
    return seen["trained"], seen["train data"]


def _write(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("kind", ["chat", "packed", "mixture"])
def test_previewed_rows_are_the_trained_rows_byte_for_byte(kind, tmp_path, monkeypatch):
    chat = _write(tmp_path / "chat.jsonl", CHAT_ROWS * 3)
    pairs = _write(tmp_path / "pairs.jsonl", PAIRS)
    raw: dict[str, Any] = {
        "chat": {"data": {"train": chat}, "max_length": 48},
        "packed": {"data": {"train": pairs}, "packing": True, "max_length": 64},
        "mixture": {"data": {"train": [{"path": pairs, "weight": 2}, {"path": chat, "weight": 1}]}},
    }[kind]
    trained, previewed = _trained_and_previewed(raw, tmp_path / "run", monkeypatch)
    assert ("position_ids" in trained.column_names) == (kind == "packed")
    # Training shuffles (and packs); the preview keeps the prepared rows in order: the same rows.
    assert sorted(_rows_of(trained)) == sorted(_rows_of(previewed))
    assert len(_rows_of(previewed)) > 0
    unshuffled, in_order = _trained_and_previewed(
        {**raw, "shuffle_dataset": False}, tmp_path / "unshuffled", monkeypatch
    )
    if kind != "packed":  # packing reorders rows (best-fit decreasing); unpacked, the order is the same too
        assert _rows_of(unshuffled) == _rows_of(in_order)
