"""Config loading and validation: YAML + dotted overrides -> a typed, validated RunConfig.

Every bad input must fail before any work starts, in one ConfigError that lists each problem by the
key the user wrote. Also loads every shipped YAML in configs/.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from sftrainer import sharding
from sftrainer.coerce import coerce
from sftrainer.config import SFTConfig
from sftrainer.errors import ConfigError, DataError
from sftrainer.run_config import apply_overrides, known_keys, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


# ---- unknown keys --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "wrong", "right"),
    [
        ("learnin_rate: 1.0e-4\n", "learnin_rate", "learning_rate"),
        ("lora:\n  rank: 8\n", "lora.rank", "lora.r"),
        ("model:\n  nme_or_path: builtin\n", "model.nme_or_path", "model.name_or_path"),
        ("data:\n  trian: a.jsonl\n", "data.trian", "data.train"),
        ("lorra:\n  r: 8\n", "lorra", "lora"),
        ("name_or_path: builtin\n", "name_or_path", "model.name_or_path"),  # section key at top level
    ],
)
def test_unknown_key_did_you_mean(tmp_path, yaml_text, wrong, right):
    message = config_error(write(tmp_path, yaml_text))
    assert f"unknown key '{wrong}'" in message
    assert f"did you mean '{right}'?" in message


def test_unknown_key_far_from_any_gives_no_guess(tmp_path):
    message = config_error(write(tmp_path, "zzzqqq: 1\n"))
    assert "unknown key 'zzzqqq'" in message
    assert "did you mean" not in message


def test_unknown_key_in_override_is_named_as_written():
    message = config_error(None, ["lora.rnk=4"])
    assert "unknown key 'lora.rnk'" in message and "did you mean 'lora.r'?" in message


def test_a_typo_on_the_command_line_names_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\n")
    message = config_error(path, ["max_stpes=30", "lora.r=0"])
    assert message.startswith("the command line: 2 problem(s)"), message
    assert str(path) not in message
    assert (
        "command line override `max_stpes=30`: unknown key 'max_stpes' (did you mean 'max_steps'?)" in message
    )
    assert "command line override `lora.r=0`: lora.r: must be >= 1" in message


def test_file_and_command_line_problems_each_name_their_source(tmp_path):
    path = write(tmp_path, "lernin_rate: 1.0e-4\n")
    message = config_error(path, ["max_stpes=30"])
    assert message.startswith(f"{path} and the command line: 2 problem(s)"), message
    lines = message.splitlines()
    assert "  unknown key 'lernin_rate' (did you mean 'learning_rate'?)" in lines  # from the file
    assert any(line.startswith("  command line override `max_stpes=30`") for line in lines)


def test_non_string_key_is_reported_not_crashed(tmp_path):
    message = config_error(write(tmp_path, "1: 2\nlora:\n  3: 4\n"))
    assert "unknown key '1'" in message and "unknown key 'lora.3'" in message


def test_known_keys_share_names_with_fields():
    keys = set(known_keys())
    assert {"learning_rate", "max_length", "packing", "train_on"} <= keys
    assert {"lora", "lora.r", "lora.alpha", "model.name_or_path", "data.train", "data.eval_split"} <= keys


# ---- all problems at once -------------------------------------------------------------------


def test_all_problems_reported_at_once(tmp_path):
    path = write(
        tmp_path,
        """\
learnin_rate: 1.0e-4
max_steps: many
train_on: everything
max_length: 0
lr_scheduler_type: cosin
model:
  nme_or_path: builtin
  dtype: float8
data:
  eval_split: 1.5
lora:
  rank: 8
  dropout: 2
""",
    )
    message = config_error(path)
    expected = [
        "unknown key 'learnin_rate' (did you mean 'learning_rate'?)",
        "max_steps: expected an integer, got 'many'",
        "train_on:",
        "max_length:",
        "lr_scheduler_type:",
        "unknown key 'model.nme_or_path' (did you mean 'model.name_or_path'?)",
        "model.dtype:",
        "data.eval_split:",
        "unknown key 'lora.rank' (did you mean 'lora.r'?)",
        "lora.dropout:",
    ]
    for text in expected:
        assert text in message, f"{text!r} missing from:\n{message}"
    assert message.startswith(f"{path}: {len(expected)} problem(s)")
    # one problem per line, each indented under the header
    assert len([line for line in message.splitlines() if line.startswith("  ")]) == len(expected)


def test_section_and_top_level_value_problems_together():
    """SFTConfig's own checks run even when a section is already wrong."""
    message = config_error(None, ["train_on=everything", "data.eval_split=1.5", "lora.r=0"])
    assert "3 problem(s)" in message
    assert "train_on:" in message and "data.eval_split:" in message and "lora.r:" in message


# ---- typed values --------------------------------------------------------------------------


def test_cli_strings_are_coerced_to_field_types():
    cfg = load_config(
        None,
        [
            "learning_rate=1e-4",
            "skip_invalid_rows=true",
            "max_steps=3",
            "num_train_epochs=2",
            "lora.r=32",
            "lora.dropout=0.1",
            "data.eval_split=0.25",
            "max_length=null",
        ],
    )
    args = cfg.train
    assert args.learning_rate == 1e-4 and isinstance(args.learning_rate, float)
    assert args.skip_invalid_rows is True
    assert args.max_steps == 3 and isinstance(args.max_steps, int)
    assert args.num_train_epochs == 2.0 and isinstance(args.num_train_epochs, float)
    assert args.max_length is None
    assert cfg.lora is not None and cfg.lora.r == 32 and cfg.lora.dropout == 0.1
    assert cfg.data.eval_split == 0.25


def test_yaml_values_are_coerced(tmp_path):
    # PyYAML reads 1e-4 (no dot) as a string: it must still become a float.
    path = write(tmp_path, "learning_rate: 1e-4\nlogging_steps: 5\nlora:\n  modules_to_save: lm_head\n")
    cfg = load_config(path)
    assert cfg.train.learning_rate == 1e-4
    assert cfg.train.logging_steps == 5
    assert cfg.lora.modules_to_save == ["lm_head"]  # one name -> a list of one


@pytest.mark.parametrize(("value", "expected"), [("q_proj", {"q_proj"}), ("[q_proj, v_proj]", {"q_proj", "v_proj"}),
                                                 ("all-linear", "all-linear")])  # fmt: skip
def test_lora_target_modules_one_name_is_a_module_name(value, expected):
    """PEFT reads a plain string as a regex over full paths: one module name must become a list."""
    from sftrainer.lora import peft_config_from

    cfg = load_config(None, [f"lora.target_modules={value}"])
    assert peft_config_from(cfg.lora).target_modules == expected


@pytest.mark.parametrize(
    ("annotation", "text", "value"),
    [
        (float, "1e-4", 1e-4),
        (float, "3", 3.0),
        (int, "3", 3),
        (int, 4.0, 4),
        (bool, "true", True),
        (bool, "False", False),
        (bool, "yes", True),
        (bool, "0", False),
        (str, 7, "7"),
        (int | None, None, None),
        (str | list[str], "a", "a"),
        (str | list[str], ["a", "b"], ["a", "b"]),
        (list[str], "a", ["a"]),
    ],
)
def test_coerce(annotation, text, value):
    out = coerce(text, annotation)
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize(
    ("annotation", "value"),
    [(float, "abc"), (float, True), (int, "3.5"), (int, 2.5), (int, True), (bool, "maybe"), (bool, 1.0),
     (str, None), (list[str], 3), (dict, "x")],
)  # fmt: skip
def test_coerce_rejects(annotation, value):
    with pytest.raises(ValueError):
        coerce(value, annotation)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("learning_rate=abc", "learning_rate"),
        ("max_steps=1.5", "max_steps"),
        ("bf16=maybe", "bf16"),
        ("lora.r=abc", "lora.r"),
        ("data.eval_split=half", "data.eval_split"),
        ("data.columns=prompt", "data.columns"),
        ("lora=5", "lora"),
    ],
)
def test_bad_value_names_the_key(override, key):
    message = config_error(None, [override])
    assert f"  command line override `{override}`: {key}: " in message
    assert repr(yaml.safe_load(override.partition("=")[2])) in message  # and shows the value


@pytest.mark.parametrize("text", ["no", "false", '"no"'])
def test_strategy_no_survives_yaml(text):
    """YAML 1.1 reads an unquoted `no` as false; eval_strategy=no must still mean 'no'."""
    cfg = load_config(None, [f"eval_strategy={text}", f"save_strategy={text}"])
    assert cfg.train.eval_strategy == "no" and cfg.train.save_strategy == "no"


def test_enum_value_typo_names_the_key():
    message = config_error(None, ["lr_scheduler_type=cosin", "optim=adamw_torc"])
    assert "lr_scheduler_type: must be one of" in message and "did you mean 'cosine'?" in message
    assert "optim: must be one of" in message and "did you mean 'adamw_torch'?" in message


# ---- dotted overrides ----------------------------------------------------------------------


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-3\nlora:\n  r: 8\n  alpha: 16\n")
    cfg = load_config(path, ["lora.r=32", "data.train=my/file.jsonl", "learning_rate=5e-4", "output_dir=o"])
    assert cfg.lora.r == 32 and cfg.lora.alpha == 16  # the rest of the section is kept
    assert cfg.data.train == "my/file.jsonl"
    assert cfg.train.learning_rate == 5e-4
    assert cfg.train.output_dir == "o"
    assert cfg.source["lora"] == {"r": 32, "alpha": 16}


def test_override_lora_null_removes_lora(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    assert load_config(path).lora is not None
    assert load_config(path, ["lora=null"]).lora is None


def test_override_lora_key_adds_lora():
    assert load_config(None).lora is None
    cfg = load_config(None, ["lora.r=4"])
    assert cfg.lora is not None and cfg.lora.r == 4 and cfg.lora.alpha == 32


def test_override_list_and_mapping_values():
    cfg = load_config(None, ["data.train=[a.jsonl, b.jsonl]", "data.columns.question=prompt"])
    assert cfg.data.train == ["a.jsonl", "b.jsonl"]
    assert cfg.data.columns == {"question": "prompt"}


def test_overrides_apply_over_defaults_without_mutating_them():
    defaults = {"data": {"train": "builtin", "columns": {"q": "prompt"}}, "max_length": 64}
    cfg = load_config(None, ["data.columns.a=response", "max_length=32"], defaults=defaults)
    assert cfg.data.columns == {"q": "prompt", "a": "response"} and cfg.train.max_length == 32
    assert defaults == {"data": {"train": "builtin", "columns": {"q": "prompt"}}, "max_length": 64}


@pytest.mark.parametrize("item", ["lora", "=3", "learning_rate"])
def test_malformed_override(item):
    assert f"override '{item}': expected key=value" in config_error(None, [item])


def test_override_value_with_equals_sign():
    cfg = load_config(None, ["run_name=a=b"])
    assert cfg.train.run_name == "a=b"


def test_apply_overrides_is_pure():
    base = {"lora": {"r": 8}}
    out = apply_overrides(base, ["lora.r=16"])
    assert out == {"lora": {"r": 16}} and base == {"lora": {"r": 8}}


# ---- YAML files --------------------------------------------------------------------------


def test_yaml_syntax_error_reports_file_and_line(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\nlora:\n  r: [8, 16\n  alpha: 32\n")
    message = config_error(path)
    match = re.match(rf"{re.escape(str(path))}:(\d+): invalid YAML", message)
    assert match, message
    assert int(match.group(1)) in (3, 4)  # the open bracket's line, or where the parser noticed


def test_yaml_tab_indentation_error(tmp_path):
    path = write(tmp_path, "lora:\n\tr: 8\n")
    assert config_error(path).startswith(f"{path}:2: invalid YAML")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_top_level_must_be_mapping(tmp_path, text):
    message = config_error(write(tmp_path, text))
    assert "top level must be a mapping" in message


def test_empty_yaml_is_all_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "# nothing here\n"))
    assert cfg.model.name_or_path == "builtin" and cfg.lora is None
    assert cfg.train.output_dir == "outputs/run"


def test_missing_config_file(tmp_path):
    assert "config file not found" in config_error(tmp_path / "nope.yaml")


# ---- impossible settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train_on=everything", "train_on"),
        ("max_length=0", "max_length"),
        ("max_length=-5", "max_length"),
        ("pad_to_multiple_of=0", "pad_to_multiple_of"),
        ("pair_template=jinja", "pair_template"),
        ("exact_match_samples=-1", "exact_match_samples"),
        ("data.eval_split=1.5", "data.eval_split"),
        ("data.eval_split=-0.1", "data.eval_split"),
        ("model.dtype=float8", "model.dtype"),
        ("lora.r=0", "lora.r"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.bias=some", "lora.bias"),
    ],
)
def test_impossible_setting_names_the_key(override, key):
    message = config_error(None, [override])
    assert f"  command line override `{override}`: {key}: " in message, message


def test_train_on_typo_suggests():
    assert "did you mean 'response'?" in config_error(None, ["train_on=responses"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["completion_only_loss=true", "train_on=all"], "completion_only_loss"),
        (["assistant_only_loss=true", "train_on=all"], "assistant_only_loss"),
        (["data.eval=builtin", "data.eval_split=0.1"], "data.eval_split"),
        (["data.eval_split_name=test", "data.eval_split=0.1"], "data.eval_split"),
        (["eval_strategy=steps", "data.eval=null"], "eval_strategy"),
    ],
)
def test_contradictory_settings(overrides, key):
    assert key in config_error(None, overrides)


def test_eval_strategy_with_eval_data_is_fine():
    cfg = load_config(None, ["eval_strategy=steps", "eval_steps=10", "data.eval_split=0.1"])
    assert cfg.train.eval_strategy == "steps"


def test_hub_dataset_keys_reach_load_dataset(tmp_path, monkeypatch):
    """data.split / eval_split_name / subset / data_files, as ultrachat_200k needs them (no network)."""
    from datasets import Dataset

    from sftrainer.sources import resolve_data

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return Dataset.from_list([{"prompt": "p", "response": kwargs["split"]}])

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    path = write(
        tmp_path,
        """\
data:
  train: HuggingFaceH4/ultrachat_200k
  split: train_sft
  eval_split_name: test_sft
  subset: default
  data_files: {train_sft: data/train_sft-*.parquet, test_sft: data/test_sft-*.parquet}
eval_strategy: steps
""",
    )
    cfg = load_config(path)
    train_ds, eval_ds = resolve_data(cfg)
    files = {"train_sft": "data/train_sft-*.parquet", "test_sft": "data/test_sft-*.parquet"}
    assert calls == [
        ("HuggingFaceH4/ultrachat_200k", {"split": "train_sft", "name": "default", "data_files": files}),
        ("HuggingFaceH4/ultrachat_200k", {"split": "test_sft", "name": "default", "data_files": files}),
    ]
    assert (train_ds[0]["response"], eval_ds[0]["response"]) == ("train_sft", "test_sft")

    calls.clear()  # a separate eval dataset gets its own split, not train's subset / files
    resolve_data(load_config(path, ["data.eval=other/evals-1.0", "data.eval_split_name=validation"]))
    assert calls[1] == ("other/evals-1.0", {"split": "validation"})


def test_resume_from_checkpoint_true_from_yaml(tmp_path):
    """Trainer.train's `True` (the latest checkpoint) is a valid YAML value, beside a path."""
    assert load_config(write(tmp_path, "resume_from_checkpoint: true\n")).train.resume_from_checkpoint is True
    assert load_config(None, ["resume_from_checkpoint=true"]).train.resume_from_checkpoint is True
    assert load_config(None, ["resume_from_checkpoint=out/checkpoint-5"]).train.resume_from_checkpoint == (
        "out/checkpoint-5"
    )
    assert "resume_from_checkpoint: expected" in config_error(None, ["resume_from_checkpoint=[1]"])


def test_trl_names_mean_what_they_mean_there():
    cfg = load_config(None, ["completion_only_loss=false"])
    assert cfg.train.train_on == "all"
    with pytest.warns(FutureWarning, match="max_length"):
        cfg = load_config(None, ["max_seq_length=128"])
    assert cfg.train.max_length == 128


# ---- packing -------------------------------------------------------------------------------


def test_packing_settings():
    assert load_config(None, ["packing=false"]).train.packing is False
    assert "`packing=sometimes`: packing: " in config_error(None, ["packing=sometimes"])
    # packing=true: either supported, or refused with a message naming the key (never ignored).
    try:
        cfg = load_config(None, ["packing=true"])
    except ConfigError as err:
        assert "packing" in str(err)
    else:
        assert cfg.train.packing is True
    if "packing_strategy" in {f.name for f in dataclasses.fields(SFTConfig)}:
        assert "packing_strategy" in config_error(None, ["packing=true", "packing_strategy=nonsense"])


# ---- step intervals: a *_steps setting and its strategy -----------------------------------

# Like the built-in demo config, which says save_strategy: 'no' (and here logs once per epoch).
INTERVALS_OFF = {
    "output_dir": "out",
    "save_strategy": "no",
    "eval_strategy": "no",
    "logging_strategy": "epoch",
}


@pytest.mark.parametrize(
    ("kwargs", "strategy", "value"),
    [
        ({"eval_steps": 5}, "eval_strategy", "steps"),  # transformers' default 'no' would ignore it
        ({"save_steps": 7}, "save_strategy", "steps"),  # already transformers' default
        ({"logging_steps": 3, "logging_strategy": None}, "logging_strategy", "steps"),  # None: unset
    ],
)
def test_python_steps_without_their_strategy_turn_it_to_steps(caplog, kwargs, strategy, value):
    with caplog.at_level("INFO", logger="sftrainer"):
        args = SFTConfig(output_dir="out", **kwargs)
    assert getattr(args, strategy) == value
    if kwargs.get("eval_steps"):
        assert (
            "eval_steps=5 without eval_strategy: set to 'steps' (instead of the default 'no')" in caplog.text
        )
        assert args.eval_steps == 5 and args._implied == ("eval_strategy",)
    assert "has no effect" not in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"save_strategy": "no", "save_steps": 10},
         "save_steps=10 has no effect: save_strategy is 'no' (set save_strategy='steps' to save every 10 steps)"),
        ({"eval_strategy": "epoch", "eval_steps": 50}, "eval_steps=50 has no effect: eval_strategy is 'epoch'"),
        ({"logging_strategy": "epoch", "logging_steps": 5}, "logging_steps=5 has no effect"),
    ],
)  # fmt: skip
def test_python_steps_that_their_strategy_ignores_are_a_warning(caplog, kwargs, message):
    with caplog.at_level("INFO", logger="sftrainer"):
        args = SFTConfig(output_dir="out", **kwargs)
    assert message in caplog.text
    strategy = next(k for k in kwargs if k.endswith("_strategy"))
    assert getattr(args, strategy) == kwargs[strategy]  # what the user set stays


def test_copies_and_defaults_say_nothing(caplog):
    """A copy, a replace() and a strategy with the default steps beside it (a resolved config, a
    converted TrainingArguments) are neither changed nor warned about."""
    from transformers import TrainingArguments

    from sftrainer.config import to_sft_config

    with caplog.at_level("INFO", logger="sftrainer"):
        implied = SFTConfig(output_dir="out", eval_steps=5)
        caplog.clear()
        assert dataclasses.replace(implied, learning_rate=1e-3).eval_strategy == "steps"
        assert SFTConfig(output_dir="out", save_strategy="no", save_steps=500).save_strategy == "no"
        assert to_sft_config(TrainingArguments(output_dir="out", save_strategy="no")).save_strategy == "no"
    assert "eval_steps" not in caplog.text and "has no effect" not in caplog.text
    # A TrainingArguments carries no record of what its caller set: its eval_strategy counts as set.
    with caplog.at_level("INFO", logger="sftrainer"):
        converted = to_sft_config(TrainingArguments(output_dir="out", eval_steps=50))
    assert converted.eval_strategy == "no" and "eval_steps=50 has no effect" in caplog.text


@pytest.mark.parametrize("key", ["save", "eval", "logging"])
def test_a_command_line_steps_override_beats_the_strategy_of_the_builtin_config(caplog, key):
    """`sftrainer train save_steps=10`: the demo's save_strategy 'no' gave no checkpoint, silently."""
    defaults = {**INTERVALS_OFF, "data": {"eval": "e.jsonl"}}
    with caplog.at_level("INFO", logger="sftrainer"):
        cfg = load_config(None, [f"{key}_steps=10"], defaults=defaults)
    assert getattr(cfg.train, f"{key}_strategy") == "steps" and getattr(cfg.train, f"{key}_steps") == 10
    was = "epoch" if key == "logging" else "no"
    assert (
        f"{key}_steps=10 on the command line: {key}_strategy set to 'steps' (the built-in config sets '{was}')"
        in caplog.text
    )
    assert "has no effect" not in caplog.text


def test_a_command_line_steps_override_beats_the_strategy_of_a_yaml_file(tmp_path, caplog):
    path = write(
        tmp_path, "save_strategy: no\neval_strategy: epoch\ndata:\n  eval: e.jsonl\n"
    )  # YAML reads no as false
    with caplog.at_level("INFO", logger="sftrainer"):
        cfg = load_config(path, ["save_steps=10", "eval_steps=20"])
    assert (cfg.train.save_strategy, cfg.train.save_steps) == ("steps", 10)
    assert (cfg.train.eval_strategy, cfg.train.eval_steps) == ("steps", 20)
    assert f"({path} sets 'no')" in caplog.text and f"({path} sets 'epoch')" in caplog.text


def test_steps_and_strategy_set_together_are_a_warning_not_a_change(tmp_path, caplog):
    """In one YAML file, or both on the command line: the strategy the user wrote stays."""
    path = write(tmp_path, "save_strategy: 'no'\nsave_steps: 10\n")
    with caplog.at_level("INFO", logger="sftrainer"):
        from_file = load_config(path)
        on_the_line = load_config(None, ["save_strategy=no", "save_steps=10"], defaults={"output_dir": "o"})
    assert from_file.train.save_strategy == "no" == on_the_line.train.save_strategy
    assert caplog.text.count("save_steps=10 has no effect: save_strategy is 'no'") == 2


def test_eval_steps_alone_in_yaml_evaluates_and_needs_eval_data(tmp_path):
    cfg = load_config(write(tmp_path, "eval_steps: 5\ndata:\n  eval: e.jsonl\n"))
    assert (cfg.train.eval_strategy, cfg.train.eval_steps) == ("steps", 5)
    message = config_error(write(tmp_path, "eval_steps: 5\n"))
    assert "eval_strategy: 'steps' (set by eval_steps=5) needs evaluation data" in message
    assert "or remove eval_steps" in message


# ---- the resolved config -----------------------------------------------------------------


def test_source_round_trips(tmp_path):
    """What a run saves as sftrainer_config.yaml loads back to the same config."""
    cfg = load_config(REPO / "configs" / "builtin-lora.yaml", ["lora.r=4", "max_steps=5"])
    saved = write(tmp_path, yaml.safe_dump(cfg.source, sort_keys=False), "saved.yaml")
    again = load_config(saved)
    assert again.source == cfg.source
    assert again.lora == cfg.lora and again.data == cfg.data and again.model == cfg.model
    assert again.train.to_dict() == cfg.train.to_dict()


# ---- shipped configs --------------------------------------------------------------------


def test_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"builtin-full.yaml", "builtin-lora.yaml", "chat-lora.yaml"} <= names


def needs_deepspeed(path: Path) -> bool:
    return "deepspeed" in yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config(path, monkeypatch):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    # the command that runs it; the multi-GPU ones say how many processes
    assert re.fullmatch(rf"# sftrainer train configs/{re.escape(path.name)}( --nproc \d+)?", first), (
        "first line must be the command that runs it"
    )
    monkeypatch.chdir(REPO)  # the command runs from the repository root
    if needs_deepspeed(path) and not sharding.deepspeed_available():
        # Without DeepSpeed the config stops at that one key (test_shipped_deepspeed_config checks the rest).
        with pytest.raises(
            ConfigError, match=r"1 problem.*\n  deepspeed: DeepSpeed is not installed: pip install"
        ):
            load_config(Path("configs") / path.name)
        pytest.skip("deepspeed is not installed: the full load needs it (pip install deepspeed, with CUDA)")
    cfg = load_config(Path("configs") / path.name)
    # its data files are shipped
    sources = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    sources = [s["path"] if isinstance(s, dict) else s for s in sources]  # a mixture lists mappings
    for source in [*sources, cfg.data.eval]:
        if source is not None and Path(source).suffix in (".jsonl", ".json", ".csv", ".parquet"):
            assert (REPO / source).is_file(), f"{source} is not shipped"
    # it writes somewhere of its own, not into another config's directory
    assert cfg.train.output_dir.startswith("outputs/")


def test_shipped_configs_write_to_distinct_dirs():
    dirs = [yaml.safe_load(p.read_text(encoding="utf-8"))["output_dir"] for p in CONFIGS]
    assert len(set(dirs)) == len(dirs)


DEEPSPEED_CONFIGS = [p for p in CONFIGS if needs_deepspeed(p)]


@pytest.mark.parametrize("path", DEEPSPEED_CONFIGS, ids=[p.name for p in DEEPSPEED_CONFIGS])
def test_shipped_deepspeed_config(path):
    """What can be checked without DeepSpeed: its ZeRO stage is the file's name, the batch and precision
    keys follow the training keys ("auto"), and sftrainer's own checks pass."""
    ds = yaml.safe_load(path.read_text(encoding="utf-8"))["deepspeed"]
    assert f"zero{ds['zero_optimization']['stage']}.yaml" == path.name
    assert sharding.deepspeed_config_problems(ds) == []
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert ds[key] == "auto", f"{key} must follow the training keys"
    assert ds["bf16"] == {"enabled": "auto"} and ds["fp16"] == {"enabled": "auto"}
    json.dumps(ds)  # what DeepSpeed receives is plain JSON


def test_shipped_fsdp_config_resolves_to_fsdp2():
    cfg = load_config(REPO / "configs" / "fsdp2.yaml")
    plugin = cfg.train.fsdp_plugin_args  # what transformers hands to accelerate's FSDP plugin
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["state_dict_type"] == "SHARDED_STATE_DICT"
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert cfg.train.deepspeed is None and cfg.lora is None


SKIP = {"output_dir", "logging_dir", "run_name"}  # where a run writes, not what it does


def train_settings(cfg, skip=SKIP) -> dict:
    return {k: v for k, v in cfg.train.to_dict().items() if k not in skip}


def test_builtin_full_matches_the_demo():
    from sftrainer import builtin

    full = load_config(REPO / "configs" / "builtin-full.yaml")
    demo = load_config(None, defaults=builtin.DEMO_CONFIG)
    assert full.model == demo.model and full.data == demo.data and full.lora is None
    assert train_settings(full) == train_settings(demo)


def test_builtin_lora_is_builtin_full_plus_lora():
    """The two shipped built-in configs differ only in LoRA (and its learning rate): an A/B of methods."""
    full = load_config(REPO / "configs" / "builtin-full.yaml")
    lora = load_config(REPO / "configs" / "builtin-lora.yaml")
    assert lora.lora is not None and lora.lora.r >= 1
    assert lora.model == full.model and lora.data == full.data
    assert train_settings(lora, SKIP | {"learning_rate"}) == train_settings(full, SKIP | {"learning_rate"})


def test_yaml_data_columns_are_applied(tmp_path):
    """data.columns renames the user's columns before the format is detected (it used to be parsed and
    never applied, although the README's main example uses it)."""
    import json

    from sftrainer.sources import resolve_data

    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(4)))
    cfg = load_config(
        None,
        [f"data.train={path}", "data.columns={question: prompt, answer: response}", "data.eval_split=0.5"],
    )
    train_ds, eval_ds = resolve_data(cfg)
    assert set(train_ds.column_names) == set(eval_ds.column_names) == {"prompt", "response"}
    bad = load_config(None, [f"data.train={path}", "data.columns={questoin: prompt}"])
    with pytest.raises(DataError, match="did you mean 'question'"):
        resolve_data(bad)


# ---- streaming and hub revisions ------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["data.streaming=true"], "data.streaming: a stream has no length"),
        (["data.streaming=true", "max_steps=5", "data.eval_split=0.1"], "a stream cannot hold rows out"),
        (
            ["data.streaming=true", "max_steps=5", "data.train=[{path: a.jsonl, weight: 1}]"],
            "a mixture samples rows from each source",
        ),
    ],
)
def test_streaming_settings_that_cannot_work_are_refused(overrides, words):
    assert words in config_error(None, overrides)


def test_streaming_and_revision_reach_the_loader():
    cfg = load_config(None, ["data.streaming=true", "max_steps=5", "data.revision=v2", "data.train=org/set"])
    assert cfg.data.hub_args() == {
        "split": "train",
        "subset": None,
        "data_files": None,
        "revision": "v2",
        "streaming": True,
    }
    assert cfg.data.hub_args(eval=True)["revision"] == "v2" and "streaming" not in cfg.data.hub_args(
        eval=True
    )
