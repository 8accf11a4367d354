"""The prepared-data cache: a second run reads it, anything that changes the rows misses it,
``overwrite_cache`` forces a new preparation, and processes starting at once are safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tokenizers_zoo as zoo
from datasets import load_dataset

from sftrainer.data import cache as cache_module
from sftrainer.data import prepare as prepare_module
from sftrainer.data.cache import auto_num_proc
from sftrainer.data.prepare import DataSettings, prepare

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def calls(monkeypatch):
    """How many batches the tokenizing function was called on."""
    counter = []
    original = prepare_module._TokenizeBatch.__call__

    def counting(self, batch, indices):
        counter.append(len(indices))
        return original(self, batch, indices)

    monkeypatch.setattr(prepare_module._TokenizeBatch, "__call__", counting)
    return counter


def run(path, tokenizer, **settings):
    dataset = load_dataset(
        "json", data_files=str(path), split="train", cache_dir=os.environ["HF_DATASETS_CACHE"]
    )
    prepared, _ = prepare(dataset, tokenizer, DataSettings(**settings), "train")
    return prepared


def test_a_second_preparation_reads_the_cache(data_file, calls):
    tok = zoo.chatml()
    first = run(data_file, tok)
    assert sum(calls) == 40
    calls.clear()
    again = run(data_file, tok)
    assert calls == [] and again.to_list() == first.to_list()
    assert again.cache_files[0]["filename"] == first.cache_files[0]["filename"]


def test_overwrite_cache_prepares_again(data_file, calls):
    tok = zoo.chatml()
    first = run(data_file, tok)
    calls.clear()
    forced = run(data_file, tok, overwrite_cache=True)
    assert sum(calls) == 40 and forced.to_list() == first.to_list()


@pytest.mark.parametrize(
    "change",
    [
        {"max_length": 45},
        {"train_on": "all"},
        {"pair_template": "raw"},
        {"chat_template_kwargs": {"x": 1}},
    ],
)
def test_a_setting_that_changes_the_rows_misses_the_cache(data_file, calls, change):
    tok = zoo.chatml()
    run(data_file, tok)
    calls.clear()
    run(data_file, tok, **change)
    assert sum(calls) == 40


def test_another_tokenizer_or_template_misses_the_cache(data_file, calls):
    run(data_file, zoo.chatml())
    calls.clear()
    run(data_file, zoo.llama3())
    assert sum(calls) == 40
    calls.clear()
    tok = zoo.chatml()
    tok.chat_template = tok.chat_template.replace("You are a helpful assistant.", "Be brief.")
    run(data_file, tok)
    assert sum(calls) == 40


def test_the_number_of_processes_does_not_change_the_cache_key(data_file, calls):
    tok = zoo.chatml()
    first = run(data_file, tok)
    again = run(data_file, tok, num_proc=1)
    assert again._fingerprint == first._fingerprint


def test_auto_num_proc_is_one_per_ten_thousand_rows_up_to_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    assert [auto_num_proc(n) for n in (0, 9_999, 10_000, 25_000, 10**6)] == [1, 1, 1, 2, 4]


SCRIPT = textwrap.dedent(
    """
    import hashlib, json, sys
    sys.path[:0] = [{tests!r}, {root!r}]
    import tokenizers_zoo as zoo
    from datasets import load_dataset
    from sftrainer.data.prepare import DataSettings, prepare
    ds = load_dataset("json", data_files={path!r}, split="train")
    out, _ = prepare(ds, zoo.chatml(), DataSettings(), "train")
    print(hashlib.sha256(json.dumps(out.to_list()).encode()).hexdigest())
    """
)


@pytest.mark.slow
def test_processes_preparing_the_same_data_at_once_agree(data_file):
    """Two runs started together on one cache (not under torchrun: nothing orders them) both
    finish, with the same rows; datasets writes each cache file under a temporary name first."""
    code = SCRIPT.format(tests=str(ROOT / "tests" / "data"), root=str(ROOT), path=str(data_file))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err.decode()[-2000:] for _, err in outs]
    digests = {out.decode().split()[-1] for out, _ in outs}
    assert len(digests) == 1


def test_unset_num_proc_stays_in_one_process_for_what_cannot_be_pickled(monkeypatch):
    """A formatting_func holding a generator cannot go to another process: the rows are still prepared."""
    from datasets import Dataset

    monkeypatch.setattr(cache_module, "ROWS_PER_PREPARE_PROCESS", 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    suffixes = (" ." for _ in iter(int, 1))  # endless, and not picklable

    def formatting_func(row):
        return {"prompt": row["q"], "completion": " " + row["a"] + next(suffixes)}

    rows = Dataset.from_list([{"q": f"q{i}", "a": f"a{i}"} for i in range(8)])
    prepared, stats = prepare(rows, zoo.chatml(), DataSettings(), "train", formatting_func)
    assert stats.kept == 8 and len(prepared) == 8
