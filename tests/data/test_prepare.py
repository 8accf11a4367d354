"""``prepare``: counts (truncated, dropped), batched and parallel tokenization, lazy streaming."""

from __future__ import annotations

import gc

import pytest
import tokenizers_zoo as zoo
from datasets import Dataset, DatasetDict, IterableDataset

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.cache import shared_heap
from sftrainer.data.load import load, split_dataset_dict
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.errors import ConfigError, DataError

LONG_PROMPT = "Summarise: the cat sat on the mat. " * 6


@pytest.fixture(scope="module")
def chatml():
    return zoo.chatml()


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(n)]


def test_output_rows_have_only_input_ids_and_labels(chatml):
    prepared, stats = prepare(load(pairs(3)), chatml, DataSettings())
    assert prepared.column_names == ["input_ids", "labels"]
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_empty, stats.dropped_invalid) == (
        3,
        3,
        0,
        0,
        0,
    )


def test_truncation_is_counted(chatml):
    data = [
        {"prompt": "Hi?", "response": "Hello."},
        {"prompt": "Name a river there.", "response": "The Tiber. " * 10},
    ]
    full, _ = zoo.prep(data, chatml)
    max_length = len(full[0]["input_ids"]) + 3  # row 1 fits, row 2 is cut inside its answer
    assert len(full[1]["input_ids"]) > max_length
    rows, stats = zoo.prep(data, chatml, max_length=max_length)
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_empty) == (2, 2, 1, 0)
    assert rows[0] == full[0]
    assert rows[1]["input_ids"] == full[1]["input_ids"][:max_length]
    assert rows[1]["labels"] == full[1]["labels"][:max_length]
    assert f"1 truncated to max_length={max_length}" in stats.summary(max_length)


def test_rows_with_no_trained_token_left_are_dropped_and_counted(chatml):
    data = [{"prompt": LONG_PROMPT, "response": "Cat on mat."}, {"prompt": "Hi?", "response": "Hello."}]
    full, _ = zoo.prep(data, chatml)
    first_trained = full[0]["labels"].index(next(x for x in full[0]["labels"] if x != IGNORE_INDEX))
    max_length = first_trained  # the long prompt fills max_length: its answer is cut away entirely
    assert len(full[1]["input_ids"]) <= max_length
    rows, stats = zoo.prep(data, chatml, max_length=max_length)
    assert (stats.rows, stats.kept, stats.truncated, stats.dropped_empty) == (2, 1, 0, 1)
    assert rows == [full[1]]  # never kept as all -100
    assert "1 dropped: no trained token left" in stats.summary(max_length)


def test_every_kept_row_has_a_trained_token(chatml):
    data = [{"prompt": LONG_PROMPT[: 12 * k], "response": "Cat on mat."} for k in range(1, 18)]
    rows, stats = zoo.prep(data, chatml, max_length=40)
    assert stats.kept + stats.dropped_empty == len(data) and stats.dropped_empty > 0 and stats.kept > 0
    assert stats.truncated > 0
    for row in rows:
        assert len(row["input_ids"]) <= 40
        assert any(label != IGNORE_INDEX for label in row["labels"][1:])


def test_all_rows_empty_after_truncation_is_an_error(chatml):
    with pytest.raises(DataError) as err:
        zoo.prep([{"prompt": LONG_PROMPT, "response": "Cat."}], chatml, max_length=8)
    assert "no row has any token to train on" in str(err.value)
    assert "1 dropped: no trained token left" in str(err.value)


def test_pretokenized_truncation_and_empty_rows_are_counted(chatml):
    data = [
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
        {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, -100, 5]},
        {"input_ids": [1, 2], "labels": [-100, 2]},
    ]
    rows, stats = zoo.prep(data, chatml, max_length=4)
    assert (stats.kept, stats.truncated, stats.dropped_empty) == (2, 1, 1)
    assert rows == [{"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]}, data[2]]


def test_num_proc_gives_identical_rows(chatml):
    data = load(
        [
            *pairs(12),
            {"prompt": "Q", "response": ""},  # invalid
            {"prompt": "Answer: ", "response": "four."},
            {"prompt": LONG_PROMPT, "response": "Cat."},  # nothing left to train at max_length=45
        ]
    )
    settings = DataSettings(max_length=45, skip_invalid_rows=True)
    one, one_stats = prepare(data, chatml, settings)
    two, two_stats = prepare(data, chatml, DataSettings(**{**settings.__dict__, "num_proc": 2}))
    assert one.to_list() == two.to_list()
    assert one_stats == two_stats
    assert (one_stats.kept, one_stats.dropped_invalid, one_stats.dropped_empty) == (13, 1, 1)
    assert one_stats.truncated > 0
    assert gc.get_freeze_count() == 0  # unfrozen once the worker processes are done


def test_objects_are_left_out_of_garbage_collection_only_while_worker_processes_run():
    assert gc.get_freeze_count() == 0
    with shared_heap(2):
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    for one_process in (1, None):
        with shared_heap(one_process):
            assert gc.get_freeze_count() == 0
    with pytest.raises(DataError), shared_heap(2):
        raise DataError("a worker failed")
    assert gc.get_freeze_count() == 0


def test_a_freeze_of_the_callers_own_is_left_as_it_is(monkeypatch):
    """Neither frozen again nor unfrozen. Asserted on the calls, not on ``gc.get_freeze_count()``
    staying equal: a frozen object whose last reference goes is still freed by reference counting,
    so the count can drop by itself (a CI run saw 558533 after 558535)."""
    gc.freeze()
    try:
        calls = []
        monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
        monkeypatch.setattr(gc, "unfreeze", lambda: calls.append("unfreeze"))
        with shared_heap(2):
            pass
        with pytest.raises(DataError), shared_heap(2):
            raise DataError("a worker failed")
        assert calls == []
        monkeypatch.undo()
        assert gc.get_freeze_count() > 0  # still frozen, as the caller left it
    finally:
        gc.unfreeze()


def test_map_is_batched_and_batch_size_does_not_matter(chatml, monkeypatch):
    """Tokenization runs once per batch of rows (``Dataset.map(batched=True)``)."""
    from sftrainer.data import tokenize

    calls = []
    encode = tokenize.ExampleTokenizer.encode

    def counting(self, rows):
        calls.append(len(rows))
        return encode(self, rows)

    monkeypatch.setattr(tokenize.ExampleTokenizer, "encode", counting)
    prepared, _ = prepare(load(pairs(30)), chatml, DataSettings())
    assert calls == [30]
    one_by_one = [prepare(load([row]), chatml, DataSettings())[0][0] for row in pairs(30)[:3]]
    assert prepared.to_list()[:3] == one_by_one


def test_iterable_dataset_is_prepared_lazily(chatml):
    read = []
    data = pairs(5)

    def gen():
        for row in data:
            read.append(row)
            yield row

    stream = IterableDataset.from_generator(gen)
    prepared, stats = prepare(stream, chatml, DataSettings())
    assert len(read) <= 1  # at most the first row, to learn the columns
    assert isinstance(prepared, IterableDataset)
    eager, _ = prepare(Dataset.from_list(data), chatml, DataSettings())
    assert list(prepared) == eager.to_list()
    assert stats.format == "prompt_response, chat template"


def test_iterable_dataset_bad_row_surfaces_when_reached(chatml):
    data = [*pairs(2), {"prompt": "Q", "response": 7}, *pairs(1)]
    stream = load(data).to_iterable_dataset()
    prepared, _ = prepare(stream, chatml, DataSettings())
    with pytest.raises(DataError, match="row 3: field 'response': must be a string, got int"):
        list(prepared)
    skipped, _ = prepare(stream, chatml, DataSettings(skip_invalid_rows=True))
    assert len(list(skipped)) == 3


def test_iterable_dataset_drops_rows_with_nothing_to_train(chatml):
    data = [{"prompt": LONG_PROMPT, "response": "Cat."}, {"prompt": "Hi?", "response": "Hello."}]
    prepared, _ = prepare(Dataset.from_list(data).to_iterable_dataset(), chatml, DataSettings(max_length=60))
    assert len(list(prepared)) == 1


def test_dataset_dict_train_and_eval(chatml):
    dd = DatasetDict(train=Dataset.from_list(pairs(4)), test=Dataset.from_list(pairs(2)))
    train, held_out = split_dataset_dict(dd)
    prepared_train, train_stats = prepare(train, chatml, DataSettings(), name="train data")
    prepared_eval, eval_stats = prepare(held_out, chatml, DataSettings(), name="eval data")
    assert (train_stats.kept, eval_stats.kept) == (4, 2)
    assert prepared_eval.to_list() == prepared_train.to_list()[:2]


def test_bad_pair_template_setting(chatml):
    with pytest.raises(ConfigError, match="pair_template: must be one of"):
        prepare(load(pairs(1)), chatml, DataSettings(pair_template="chatml"))


def test_formatting_func_pairs_render_like_the_same_columns(chatml):
    """A formatting_func returning {prompt, completion} is rendered raw, as those columns are
    (it used to go through the chat template), and {prompt, response} through the template."""
    rows = [{"q": "2+2=", "a": "4"}]
    as_columns, _ = zoo.prep([{"prompt": "2+2=", "completion": "4"}], chatml)
    via_func, _ = prepare(
        load(rows),
        chatml,
        DataSettings(max_length=None),
        formatting_func=lambda r: {"prompt": r["q"], "completion": r["a"]},
    )
    assert list(via_func) == as_columns
    assert "<|im_start|>" not in chatml.decode(as_columns[0]["input_ids"])
    chat, _ = prepare(
        load(rows),
        chatml,
        DataSettings(max_length=None),
        formatting_func=lambda r: {"prompt": r["q"], "response": r["a"]},
    )
    assert "<|im_start|>assistant" in chatml.decode(chat[0]["input_ids"])


def test_raw_pairs_keep_the_system_column(chatml):
    rows, _ = zoo.prep([{"system": "Answer in digits.", "prompt": "2+2=", "completion": "4"}], chatml)
    text = chatml.decode(rows[0]["input_ids"])
    assert text == "Answer in digits.\n\n2+2=4<|im_end|>"
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == ["4<|im_end|>"]


def test_split_turns_gives_one_row_per_assistant_turn(chatml):
    rows, stats = zoo.prep([{"messages": zoo.THREE_TURNS}], chatml, split_turns=True)
    assert (stats.rows, stats.kept) == (3, 3)
    assert [zoo.trained_spans(chatml, r["input_ids"], r["labels"]) for r in rows] == [
        ["The capital is Paris.<|im_end|>"],
        ["Rome, of course.<|im_end|>"],
        ["The Tiber.<|im_end|>"],
    ]


def test_the_prepared_cache_is_keyed_by_sftrainer_code(tmp_path, monkeypatch):
    """datasets keys a map by the function object, not the helpers it calls: a cache written by other
    sftrainer code must not be reused."""
    from sftrainer.data import cache as cache_module

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a b", "response": "c d"}\n' * 4)
    from datasets import load_dataset

    tok = zoo.chatml()
    settings = DataSettings(max_length=256)
    first, _ = prepare(load_dataset("json", data_files=str(path), split="train"), tok, settings, "train")
    again, _ = prepare(load_dataset("json", data_files=str(path), split="train"), tok, settings, "train")
    assert again._fingerprint == first._fingerprint  # same data, settings and code: the cache is reused
    monkeypatch.setattr(cache_module, "_code_version", lambda: "other code")
    changed, _ = prepare(load_dataset("json", data_files=str(path), split="train"), tok, settings, "train")
    assert changed._fingerprint != first._fingerprint
