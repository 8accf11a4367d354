"""Dataset mixtures: row counts per source, deterministic sampling, formats mixed, YAML shape and
its validation (sftrainer/data/mixture.py, the pipeline's mixture path, DataConfig)."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import tokenizers_zoo as zoo
from datasets import Dataset, IterableDataset

from sftrainer.config import SFTConfig
from sftrainer.data.mixture import Mixture, MixtureSource, plan_rows, sample_indices
from sftrainer.errors import ConfigError, DataError
from sftrainer.pipeline import DataPipeline
from sftrainer.run_config import build_config
from sftrainer.sources import resolve_data


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def completions(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} plus {i}? ", "completion": f"{2 * i}."} for i in range(n)]


def conversations(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Name river {i}."},
                {"role": "assistant", "content": f"Tiber {i}."},
            ]
        }
        for i in range(n)
    ]


def pipeline(tmp_path: Path, **args) -> DataPipeline:
    config = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_length=None, **args)
    return DataPipeline(zoo.chatml(), config)


# ---- how many rows each source gives ------------------------------------------------------------


def test_plan_all_rows_fixed_rows_and_weighted_shares():
    def src(**kw):
        return MixtureSource(data=[{"text": "x"}], **kw)

    assert plan_rows([100, 10], [src(), src()]) == [100, 10]  # no weight, no rows: all of it, once
    assert plan_rows([100, 10], [src(rows=30), src(rows=25)]) == [30, 25]  # fewer, and more than held
    # Weighted sources share their total size (110) in proportion: 1:1 -> 55 each, whatever their sizes.
    assert plan_rows([100, 10], [src(weight=1), src(weight=1)]) == [55, 55]
    assert plan_rows([100, 10], [src(weight=3), src(weight=1)]) == [82, 28]  # round(110 * 3/4) = 82
    assert plan_rows([100, 10, 7], [src(weight=1), src(weight=1), src(rows=5)]) == [55, 55, 5]


def test_sampling_is_deterministic_without_replacement_and_repeats_only_beyond_the_size():
    picked = sample_indices(100, 30, seed=1, index=0)
    assert picked == sample_indices(100, 30, seed=1, index=0) and picked == sorted(picked)
    assert len(set(picked)) == 30  # no row twice while the source has enough
    assert picked != sample_indices(100, 30, seed=2, index=0)
    assert picked != sample_indices(100, 30, seed=1, index=1)  # each source its own draw
    repeated = Counter(sample_indices(10, 25, seed=1, index=0))
    assert sum(repeated.values()) == 25 and set(repeated) == set(range(10))
    assert sorted(Counter(repeated.values()).items()) == [(2, 5), (3, 5)]  # 2 full passes + 5 more


# ---- a mix of formats through the pipeline the trainer uses -------------------------------------


def test_a_completion_file_and_a_messages_file_mix_each_prepared_in_its_format(tmp_path, caplog):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", completions(20))
    chats = write_jsonl(tmp_path / "chats.jsonl", conversations(10))
    mixture = Mixture([MixtureSource(pairs, weight=1), MixtureSource(chats, weight=1)], seed=3)
    pipe = pipeline(tmp_path, shuffle_dataset=False)
    with caplog.at_level(logging.INFO, logger="sftrainer"):
        rows = pipe(mixture, "train data", pack=False)
    assert rows.column_names == ["input_ids", "labels"] and len(rows) == 30  # 15 + 15 of 30 held
    stats = pipe.data_stats
    assert stats[f"train data [{pairs}]"].format.startswith("prompt_completion")
    assert stats[f"train data [{chats}]"].format.startswith("messages")
    assert (stats[f"train data [{pairs}]"].kept, stats[f"train data [{chats}]"].kept) == (15, 15)
    assert (stats["train data"].rows, stats["train data"].kept) == (30, 30)
    assert f"{pairs}: 15 of 20 rows (weight 1, 50.0% of the mix)" in caplog.text
    assert f"{chats}: 15 of 10 rows (weight 1, 50.0% of the mix, each row ~1.5x)" in caplog.text
    tok = zoo.chatml()
    spans = [zoo.trained_spans(tok, r["input_ids"], r["labels"]) for r in rows]
    # Prompt/completion strings are raw text (completion + EOS trained); messages use the template.
    assert spans[0][0].endswith(".<|im_end|>") and "<|im_start|>" not in tok.decode(rows[0]["input_ids"])
    assert spans[-1][0].startswith("Tiber") and "<|im_start|>assistant" in tok.decode(rows[-1]["input_ids"])
    # Every chat row once, five of them twice (15 from 10).
    chat_counts = Counter(tuple(r["input_ids"]) for r in rows.select(range(15, 30)))
    assert sorted(Counter(chat_counts.values()).items()) == [(1, 5), (2, 5)]


def test_the_same_seed_gives_the_same_mix_and_another_seed_another(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", completions(40))
    chats = write_jsonl(tmp_path / "chats.jsonl", conversations(40))

    def mix(seed):
        mixture = Mixture([MixtureSource(pairs, rows=10), MixtureSource(chats, rows=10)], seed=seed)
        return pipeline(tmp_path, shuffle_dataset=True)(mixture, "train data", pack=False)["input_ids"]

    assert mix(1) == mix(1)
    assert mix(1) != mix(2)


def test_per_source_columns_and_a_list_of_rows(tmp_path):
    mixture = Mixture(
        [
            MixtureSource(
                [{"question": "Q1", "answer": "A1."}], columns={"question": "prompt", "answer": "response"}
            ),
            MixtureSource([{"prompt": "Q2", "response": "A2."}], rows=3, name="inline"),
        ]
    )
    pipe = pipeline(tmp_path, shuffle_dataset=False)
    rows = pipe(mixture, "train data", pack=False)
    assert len(rows) == 4 and pipe.data_stats["train data [inline]"].rows == 3


def test_a_streamed_source_is_refused_with_the_reason(tmp_path):
    stream = IterableDataset.from_generator(lambda: iter([{"text": "x"}]))
    with pytest.raises(DataError, match="needs map-style data; this source is streamed"):
        pipeline(tmp_path)(Mixture([MixtureSource(stream, weight=1)]), "train data", pack=False)


def test_a_source_with_no_rows_is_refused_not_divided_by(tmp_path):
    empty = Dataset.from_dict({"text": []})
    with pytest.raises(DataError, match="has no rows"):
        pipeline(tmp_path)(
            Mixture([MixtureSource(empty, weight=1), MixtureSource([{"text": "x"}], weight=1)]),
            "train data",
            pack=False,
        )


def test_a_source_that_cannot_be_read_is_named(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", completions(2))
    with pytest.raises(DataError) as err:
        Mixture([MixtureSource(good), MixtureSource(str(tmp_path / "missing.jsonl"))]).loaded()
    assert "train data [" in str(err.value) and "file not found" in str(err.value)


# ---- YAML ------------------------------------------------------------------------------------------


def test_yaml_mixture_loads_each_source_with_its_own_settings(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", completions(8))
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"Q{i}", "a": f"A{i}."} for i in range(4)])
    cfg = build_config(
        {
            "seed": 7,
            "data": {
                "train": [
                    {"path": pairs, "weight": 2},
                    {"path": qa, "weight": 1, "columns": {"q": "prompt", "a": "response"}},
                ]
            },
        }
    )
    assert cfg.data.is_mixture()
    train, eval_ds = resolve_data(cfg)
    assert isinstance(train, Mixture) and eval_ds is None and train.seed == 7
    assert all(isinstance(s.data, Dataset) for s in train.sources)  # loaded up front: errors before the model
    assert len(train) == 12 and [s.label for s in train.sources] == [pairs, qa]
    assert train.sources[1].columns == {"q": "prompt", "a": "response"}
    rows = pipeline(tmp_path)(train, "train data", pack=False)
    assert len(rows) == 12  # 8 + 4 rows share 2:1


def test_plain_string_and_list_forms_are_unchanged(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", completions(3))
    b = write_jsonl(tmp_path / "b.jsonl", completions(2))
    for train, n in ((a, 3), ([a, b], 5)):
        cfg = build_config({"data": {"train": train}})
        assert not cfg.data.is_mixture()
        ds, _ = resolve_data(cfg)
        assert isinstance(ds, Dataset) and len(ds) == n


def test_yaml_mixture_problems_are_listed_together_by_key():
    with pytest.raises(ConfigError) as err:
        build_config(
            {
                "data": {
                    "train": [
                        {"path": "a.jsonl", "wieght": 2},
                        {"weight": 1},
                        {"path": "b.jsonl", "weight": 0},
                        {"path": "c.jsonl", "rows": 0},
                        {"path": "d.jsonl", "rows": 2.5},
                        {"path": "e.jsonl", "weight": "lots"},
                        {"path": "f.jsonl", "columns": "prompt"},
                    ],
                    "eval_split": 0.1,
                }
            }
        )
    message = str(err.value)
    for part in [
        "unknown key 'data.train[0].wieght' (did you mean 'weight'?); a source takes: path, weight, rows",
        "data.train[1].path: missing; each source needs a path",
        "data.train[2].weight: must be > 0, got 0",
        "data.train[3].rows: must be >= 1, got 0",
        "data.train[4].rows: must be a whole number of rows, got 2.5",
        "data.train[5].weight: must be a number, got 'lots'",
        "data.train[6].columns: must be a mapping",
        "data.eval_split: a mixture has no single data set to hold rows out of; set data.eval",
    ]:
        assert part in message, f"{part!r} not in:\n{message}"


def test_python_sources_are_validated_by_the_same_rules():
    with pytest.raises(ConfigError, match=r"source 'a.jsonl'.weight: must be > 0, got -2"):
        MixtureSource("a.jsonl", weight=-2)
    with pytest.raises(ConfigError, match=r"set weight .* or rows .*, not both"):
        MixtureSource("a.jsonl", weight=1, rows=3)
    with pytest.raises(ConfigError, match="at least one source"):
        Mixture([])


def test_the_same_file_twice_keeps_both_counts(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", completions(6))
    pipe = pipeline(tmp_path, shuffle_dataset=False)
    rows = pipe(
        Mixture([MixtureSource(pairs, rows=2), MixtureSource(pairs, rows=4)]), "train data", pack=False
    )
    assert len(rows) == 6
    assert (
        pipe.data_stats[f"train data [{pairs}]"].rows,
        pipe.data_stats[f"train data [2: {pairs}]"].rows,
    ) == (2, 4)


def test_a_small_source_weighted_like_a_large_one_is_warned_about(tmp_path, caplog):
    big = write_jsonl(tmp_path / "big.jsonl", completions(40))
    small = write_jsonl(tmp_path / "small.jsonl", completions(2))
    with caplog.at_level(logging.WARNING, logger="sftrainer"):
        rows = pipeline(tmp_path)(
            Mixture([MixtureSource(big, weight=1), MixtureSource(small, weight=1)]), "t", False
        )
    assert len(rows) == 42
    assert f"repeats every row of {small} about 10 times (21 rows drawn from 2)" in caplog.text
    assert big not in caplog.text.split("repeats every row of")[1]


def test_prepare_mixture_without_a_trainer_gives_rows_and_counts_per_source(tmp_path):
    """The function the pipeline (and a data preview) calls: no SFTConfig needed."""
    from sftrainer.data.mixture import prepare_mixture
    from sftrainer.data.prepare import DataSettings

    pairs = write_jsonl(tmp_path / "pairs.jsonl", completions(5))
    mixture = Mixture([MixtureSource(pairs, rows=3), MixtureSource(conversations(2), name="chats")])
    rows, total, parts = prepare_mixture(mixture, zoo.chatml(), DataSettings(max_length=None), seed=0)
    assert len(rows) == 5 and [s.name for s in parts] == [f"train data [{pairs}]", "train data [chats]"]
    assert (total.rows, total.kept) == (5, 5) and total.format.startswith("mixture: prompt_completion")
    again, _, _ = prepare_mixture(mixture, zoo.chatml(), DataSettings(max_length=None), seed=0)
    assert again["input_ids"] == rows["input_ids"]
