"""Loading: Python lists, datasets objects, JSON / JSONL / CSV / Parquet files, directories, globs."""

from __future__ import annotations

import json
import re

import pytest
from datasets import Dataset, DatasetDict, IterableDataset

from sftrainer.data.load import load, split_dataset_dict, train_eval_split
from sftrainer.errors import DataError

ROWS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "And of Italy?", "response": "Rome."},
    {"prompt": "Name a river there.", "response": "The Tiber."},
]


def rows_of(ds) -> list[dict]:
    return [dict(row) for row in ds]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_list_of_dicts():
    ds = load(ROWS)
    assert isinstance(ds, Dataset) and rows_of(ds) == ROWS


def test_list_with_keys_beyond_the_first_row():
    ds = load([{"text": "a"}, {"text": "b", "source": "web"}])
    assert ds.column_names == ["text", "source"]
    assert rows_of(ds) == [{"text": "a", "source": None}, {"text": "b", "source": "web"}]


def test_list_with_mixed_value_types_loads_for_row_level_checks():
    ds = load([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": 5}])
    assert [row["response"] for row in ds] == ["b", 5]


def test_dataset_and_iterable_dataset_pass_through():
    ds = Dataset.from_list(ROWS)
    assert load(ds) is ds
    it = ds.to_iterable_dataset()
    assert load(it) is it


def test_dataset_dict_needs_a_split():
    with pytest.raises(DataError, match=r"pass one split of the DatasetDict \(splits: \['train', 'test'\]\)"):
        load(DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS[:1])))


def test_split_dataset_dict():
    train, test = Dataset.from_list(ROWS), Dataset.from_list(ROWS[:1])
    assert split_dataset_dict(DatasetDict(train=train, test=test)) == (train, test)
    got_train, got_eval = split_dataset_dict(DatasetDict(train=train, validation=test))
    assert got_eval is test and got_train is train
    assert split_dataset_dict(DatasetDict(train=train))[1] is None
    with pytest.raises(DataError, match=r"no 'train' split \(splits: \['validation'\]\)"):
        split_dataset_dict(DatasetDict(validation=test))


def test_jsonl(tmp_path):
    assert rows_of(load(write_jsonl(tmp_path / "d.jsonl", ROWS))) == ROWS


def test_jsonl_with_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n\n", encoding="utf-8")
    assert rows_of(load(path)) == ROWS[:2]


def test_json_array(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    assert rows_of(load(str(path))) == ROWS


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    Dataset.from_list(ROWS).to_csv(str(path), index=False)
    assert rows_of(load(path)) == ROWS


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    assert rows_of(load(path)) == ROWS


def test_messages_survive_a_parquet_round_trip(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}]
    path = tmp_path / "m.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    assert rows_of(load(path)) == rows


def test_directory_glob_and_list_of_files(tmp_path):
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "sub" / "b.jsonl", ROWS[1:])
    (tmp_path / "README.txt").write_text("not data")  # ignored in a directory
    assert rows_of(load(tmp_path)) == ROWS
    assert rows_of(load(str(tmp_path / "**" / "*.jsonl"))) == ROWS
    assert rows_of(load([tmp_path / "sub" / "b.jsonl", tmp_path / "a.jsonl"])) == ROWS[1:] + ROWS[:1]


def test_train_eval_split():
    train, held_out = train_eval_split(Dataset.from_list(ROWS * 4), 0.25, seed=0)
    assert (len(train), len(held_out)) == (9, 3)
    assert train_eval_split(Dataset.from_list(ROWS * 4), 0.25, seed=0)[1]["prompt"] == held_out["prompt"]
    with pytest.raises(DataError, match="needs at least 2 rows"):
        train_eval_split(Dataset.from_list(ROWS[:1]), 0.5, seed=0)
    with pytest.raises(DataError, match="map-style"):
        train_eval_split(Dataset.from_list(ROWS).to_iterable_dataset(), 0.5, seed=0)


def test_eval_split_is_deterministic_by_seed(tmp_path):
    """data.eval_split holds out the same rows for the same seed (also through the YAML run), others
    for another seed, and never a row in both parts."""
    from sftrainer.run_config import load_config
    from sftrainer.sources import resolve_data

    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(40)]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def held_out(seed: int) -> list[str]:
        train_ds, held_ds = resolve_data(
            load_config(None, [f"data.train={path}", "data.eval_split=0.25", f"seed={seed}"])
        )
        train, held = list(train_ds["prompt"]), list(held_ds["prompt"])
        assert len(held) == 10 and not set(train) & set(held)
        assert sorted(train + held) == sorted(r["prompt"] for r in rows)
        return held

    assert held_out(0) == held_out(0)
    assert held_out(0) == list(train_eval_split(Dataset.from_list(rows), 0.25, seed=0)[1]["prompt"])
    assert set(held_out(1)) != set(held_out(0))


def test_iterable_dataset_from_a_generator_is_not_read_by_load():
    read = []

    def gen():
        for row in ROWS:
            read.append(row)
            yield row

    ds = load(IterableDataset.from_generator(gen))
    assert read == []
    assert rows_of(ds) == ROWS


# ---- Hugging Face datasets: ids, splits, subsets, data_files (no network: load_dataset is recorded)


@pytest.fixture
def recorded_load_dataset(monkeypatch):
    """Replace ``datasets.load_dataset`` with a recorder returning a one-row Dataset."""
    calls = []

    def fake(path, *args, **kwargs):
        calls.append((path, args, kwargs))
        return Dataset.from_list(ROWS[:1])

    monkeypatch.setattr("datasets.load_dataset", fake)
    return calls


@pytest.mark.parametrize("dataset_id", ["teknium/OpenHermes-2.5", "HuggingFaceH4/ultrachat_200k", "imdb"])
def test_hub_ids_with_dots_and_without_org_go_to_the_hub(recorded_load_dataset, dataset_id):
    assert rows_of(load(dataset_id)) == ROWS[:1]
    assert recorded_load_dataset == [(dataset_id, (), {"split": "train"})]


def test_hub_split_subset_and_data_files_reach_load_dataset(recorded_load_dataset):
    load("HuggingFaceH4/ultrachat_200k", split="train_sft", subset="default", data_files=["data/a.parquet"])
    assert recorded_load_dataset == [
        (
            "HuggingFaceH4/ultrachat_200k",
            (),
            {"split": "train_sft", "name": "default", "data_files": ["data/a.parquet"]},
        )
    ]


def test_missing_local_file_is_not_taken_for_a_hub_id(recorded_load_dataset, tmp_path):
    for missing in ("data/train.jsonl", "data/OpenHermes.parquet", str(tmp_path / "nope"), "./train"):
        with pytest.raises(DataError, match=re.escape(f"file not found: {missing}")):
            load(missing)
    assert recorded_load_dataset == []


def test_a_missing_relative_path_says_which_directory_it_was_resolved_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for missing, words in (("data/train.jsonl", "file not found"), ("data/*.jsonl", "no file matches")):
        with pytest.raises(DataError) as info:
            load(missing)
        message = str(info.value)
        assert words in message
        assert f"looked for in the current directory {tmp_path}: {tmp_path / missing}" in message
        assert "not the YAML file's directory" in message
    with pytest.raises(DataError) as info:
        load(str(tmp_path / "absolute.jsonl"))
    assert "current directory" not in str(info.value)  # an absolute path says only itself


def test_hub_id_that_fails_says_both_what_was_tried_and_why(monkeypatch):
    def offline(path, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(DataError) as info:
        load("teknium/OpenHermes-2.5", "train data", split="train_sft")
    message = str(info.value)
    assert message.startswith("train data: 'teknium/OpenHermes-2.5' is not a local file or directory")
    assert "loading it as a Hugging Face dataset (split='train_sft') failed" in message
    assert "ConnectionError: Couldn't reach" in message


def test_local_dataset_directory_with_splits(tmp_path):
    """A script-free dataset folder (as on the Hub): data/<split>-*.parquet, loaded by split."""
    (tmp_path / "data").mkdir()
    Dataset.from_list(ROWS[:2]).to_parquet(str(tmp_path / "data" / "train_sft-00000-of-00001.parquet"))
    Dataset.from_list(ROWS[2:]).to_parquet(str(tmp_path / "data" / "test_sft-00000-of-00001.parquet"))
    assert rows_of(load(tmp_path, split="train_sft")) == ROWS[:2]
    assert rows_of(load(str(tmp_path), split="test_sft")) == ROWS[2:]
    with pytest.raises(DataError, match=r"is a local dataset directory, and loading it .* failed: .*nope"):
        load(tmp_path, split="nope")


def test_split_slices_local_files_and_subset_needs_a_dataset(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert rows_of(load(path, split="train[:2]")) == ROWS[:2]
    with pytest.raises(DataError, match=r"subset \(given\) only apply to a Hugging Face dataset"):
        load(path, subset="default")
    with pytest.raises(DataError, match=r"revision \(given\) only apply to a Hugging Face dataset"):
        load(path, revision="v1.0")


def test_hub_revision_and_streaming_reach_load_dataset(recorded_load_dataset):
    load("HuggingFaceH4/ultrachat_200k", split="train_sft", revision="3ba2d0b", streaming=True)
    assert recorded_load_dataset == [
        ("HuggingFaceH4/ultrachat_200k", (), {"split": "train_sft", "revision": "3ba2d0b", "streaming": True})
    ]


def test_a_local_file_can_be_streamed(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    stream = load(path, streaming=True)
    assert isinstance(stream, IterableDataset) and [dict(r) for r in stream] == ROWS


def test_a_guarded_stream_keeps_its_rows_and_shards(tmp_path):
    """The guard that names a stream failing midway (test_bad_input.py) changes nothing else:
    the same rows in order, and the source's shards stay shards for DataLoader workers and ranks."""
    import json

    import datasets
    from datasets.distributed import split_dataset_by_node

    from sftrainer.data.load import guard_stream

    files = []
    for k in range(3):
        path = tmp_path / f"part{k}.jsonl"
        path.write_text("".join(json.dumps({"text": f"{k}-{i}"}) + "\n" for i in range(4)))
        files.append(str(path))
    stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
    guarded = guard_stream(stream, "train data")
    assert [r["text"] for r in guarded] == [r["text"] for r in stream]
    assert guarded.num_shards == 3 and guarded.column_names == ["text"]
    assert [r["text"] for r in split_dataset_by_node(guarded, rank=1, world_size=3)] == [
        f"1-{i}" for i in range(4)
    ]
