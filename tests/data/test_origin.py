"""``origin``: which file and line each row of a loaded data set came from, through renaming,
``eval_split`` and a mixture's sample (read again from the files, only for messages)."""

from __future__ import annotations

import json

from datasets import Dataset

from sftrainer.data import origin
from sftrainer.data.load import load, rename, train_eval_split


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_places_follow_datasets_reading_of_each_file_type(tmp_path):
    row = json.dumps({"prompt": "Q", "response": "A"})
    a = write(tmp_path / "a.jsonl", f"\n{row}\n\n{row}\n")  # blank lines are not rows
    b = write(tmp_path / "b.jsonl", f"{row}\n{row}\n")
    ds = load([str(a), str(b)])
    assert len(ds) == 4
    assert origin.places(origin.origin_of(ds), range(4)) == {
        0: f"{a}:2", 1: f"{a}:4", 2: f"{b}:1", 3: f"{b}:2"
    }  # fmt: skip
    csv_file = write(tmp_path / "c.csv", 'prompt,response\n\nQ,A\n"two\nlines",B\nQ3,C\n')
    ds = load(str(csv_file))
    assert len(ds) == 3
    assert origin.places(origin.origin_of(ds), range(3)) == {
        0: f"{csv_file}:3",
        1: f"{csv_file}:4",
        2: f"{csv_file}:6",
    }
    array = write(tmp_path / "d.json", json.dumps([{"text": "x"}, {"text": "y"}], indent=2))
    assert origin.places(origin.origin_of(load(str(array))), [1]) == {1: f"{array}, item 2"}
    parquet = tmp_path / "e.parquet"
    Dataset.from_list([{"text": "x"}, {"text": "y"}]).to_parquet(str(parquet))
    assert origin.places(origin.origin_of(load(str(parquet))), [1]) == {1: f"{parquet}, row 2"}


def test_renaming_and_eval_split_keep_the_file_rows(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        "".join(json.dumps({"question": f"Q{i}", "answer": "A"}) + "\n" for i in range(20)),
    )
    ds = rename(load(str(path)), {"question": "prompt"}, "train data")
    train, test = train_eval_split(ds, 0.25, seed=0)
    for part in (train, test):
        found = origin.places(origin.origin_of(part), range(len(part)))
        lines = [int(found[k].rsplit(":", 1)[1]) for k in range(len(part))]
        assert [part[k]["prompt"] for k in range(len(part))] == [f"Q{n - 1}" for n in lines]


def test_a_source_is_named_once_and_rows_without_files_by_number(tmp_path):
    path = write(tmp_path / "t.jsonl", json.dumps({"text": "x"}) + "\n")
    known = origin.origin_of(load(str(path)))
    assert origin.where("train data", known) == f"train data ({path})"
    assert origin.where(f"train data [{path}]", known) == f"train data [{path}]"  # a mixture's source name
    assert origin.origin_of(load([{"text": "x"}])) is None
    assert origin.where("train data", None) == "train data"
    assert origin.places(None, [0, 4]) == {0: "row 1", 4: "row 5"}
