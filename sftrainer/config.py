"""Configuration: ``SFTConfig`` (a ``TrainingArguments``) plus model, data and LoRA settings.

One surface: a YAML file's top-level keys are ``SFTConfig`` fields, plus the sections ``model``,
``data`` and ``lora``; command-line overrides use the same names (``lora.r=32``). Unknown keys and
bad values are all reported at once, each by the name the user wrote, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from sftrainer import precision
from sftrainer.coerce import coerce
from sftrainer.compat import normalise_trl_values, sft_values_from, trl_field_problems
from sftrainer.data.pack import packing_strategy_problems
from sftrainer.data.prepare import DataSettings
from sftrainer.errors import ConfigError, did_you_mean
from sftrainer.model import chat_template_problems

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig(TrainingArguments):
    """``TrainingArguments`` plus the settings of supervised fine-tuning.

    Drop-in for TRL's ``SFTConfig``: ``max_length``, ``dataset_text_field``, ``packing``,
    ``completion_only_loss``, ``assistant_only_loss``, ``dataset_num_proc`` and ``model_init_kwargs``
    mean what they mean there.
    """

    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized row; longer rows are truncated and counted. None: no limit."},
    )
    dataset_text_field: str | None = field(
        default=None,
        metadata={
            "help": "Column holding plain text. 'prompt' on prompt/response rows trains on the response."
        },
    )
    train_on: str = field(
        default="response",
        metadata={
            "help": "Which tokens carry loss: 'response' (responses / assistant turns + end of turn), "
            "'last_turn' (the last assistant turn only) or 'all'."
        },
    )
    pair_template: str = field(
        default="auto",
        metadata={
            "help": "How prompt/response pairs are rendered: 'chat' (the chat template), 'raw' "
            "(prompt + response + EOS) or 'auto' (raw for prompt/completion, chat otherwise)."
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A Jinja chat template, or a path to one (.jinja/.j2/.txt/.json), replacing the tokenizer's."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "TRL name: a .jinja file, or a tokenizer directory / hub id whose template (and EOS) to use."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "End-of-sequence token to train, replacing the tokenizer's (must be in its vocabulary)."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Padding token, replacing the tokenizer's (must be in its vocabulary); default: its own, else EOS."
        },
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Extra variables for the chat template, e.g. {enable_thinking: false}; a row's own "
            "chat_template_kwargs column wins."
        },
    )
    split_turns: bool = field(
        default=False,
        metadata={
            "help": "Train each assistant turn of a conversation as its own example, its history rendered "
            "as at inference (for templates that rewrite history, e.g. drop past reasoning)."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack rows into sequences of up to max_length tokens (best-fit decreasing); rows never "
            "attend to each other and keep their own positions."
        },
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "'bfd': rows longer than max_length are truncated (counted); 'bfd_split': they are "
            "split into max_length pieces instead; 'wrapped': rows are concatenated and cut every max_length "
            "tokens (continued pre-training), each piece still isolated from its neighbours."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Without packing: concatenate each batch into one row (no padding tokens at all)."},
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval data too; default: the same as packing."}
    )
    completion_only_loss: bool | None = field(
        default=None, metadata={"help": "TRL name: False trains on all tokens (same as train_on='all')."}
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "TRL name: True trains on assistant turns only (already the default)."},
    )
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Processes used to tokenize the data."}
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Drop (and count) rows that cannot be used instead of failing."}
    )
    pad_to_multiple_of: int | str | None = field(
        default=None,
        metadata={"help": "Pad batches to a multiple of this ('auto', TRL's default: None here)."},
    )
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the model is given as a path."},
    )
    exact_match_samples: int = field(
        default=0,
        metadata={
            "help": "Score this many eval rows by greedy generation (exact match with the reference "
            "response) at each evaluation; 0 turns it off."
        },
    )
    exact_match_max_new_tokens: int = field(
        default=64, metadata={"help": "Generation limit for exact match."}
    )
    # TRL 1.16 fields (same names, defaults and meaning; see sftrainer/compat.py and the README).
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "TRL: {'skip_prepare_dataset': True} uses the data as given (tokenized rows)."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end of a row longer than max_length is kept: 'keep_start' or 'keep_end'."},
    )
    shuffle_dataset: bool = field(
        default=False, metadata={"help": "Shuffle the prepared rows (before and after packing), with seed."}
    )
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "'nll' (cross-entropy) or 'dft' (token losses weighted by the detached p(target))."
        },
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Keep the activations saved for backward in CPU memory (GPU only)."},
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE load-balancing loss weight; None: the model config's; 0: off."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint when model is a path (unsafe)."}
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Deprecated TRL name of max_length."})
    # TrainingArguments types this `str | None`, which refused YAML's `true` (Trainer.train's idiom).
    resume_from_checkpoint: str | bool | None = field(
        default=None,
        metadata={
            "help": "A checkpoint directory to resume from, or true: the latest checkpoint in output_dir."
        },
    )

    # Defaults suited to fine-tuning rather than pre-training.
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N optimizer steps."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision; default: on when the accelerator (CUDA, MPS, XPU) supports it."
        },
    )

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError("Invalid SFTConfig:\n" + "\n".join(f"  {p}" for p in problems))
        normalise_trl_values(self)
        if self.max_seq_length is not None:
            warnings.warn("max_seq_length is deprecated; use max_length.", FutureWarning, stacklevel=3)
            self.max_length, self.max_seq_length = self.max_seq_length, None
        if self.completion_only_loss is False:
            self.train_on = "all"
        precision.apply_mixed_precision(self)
        if self.dataloader_pin_memory and not precision.has_accelerator():
            # Pinning needs a device to copy to; without one torch warns on every DataLoader.
            self.dataloader_pin_memory = False
        try:
            super().__post_init__()
        except ValueError as err:
            raise ConfigError(f"Invalid SFTConfig: {err}") from None

    def problems(self) -> list[str]:
        """Every invalid SFT setting, as 'key: problem'."""
        out = self.data_settings().problems() + packing_strategy_problems(self.packing_strategy)
        out += trl_field_problems(self)
        for key in ("max_length", "max_seq_length", "pad_to_multiple_of"):
            value = getattr(self, key)
            if key == "pad_to_multiple_of" and value == "auto":
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                out.append(f"{key}: must be a positive integer or null, got {value!r}")
        if self.completion_only_loss is True and self.train_on == "all":
            out.append("completion_only_loss=True contradicts train_on='all'")
        if self.assistant_only_loss and self.train_on == "all":
            out.append("assistant_only_loss=True contradicts train_on='all'")
        if (self.packing or self.eval_packing) and self.max_length is None and self.max_seq_length is None:
            out.append("packing: needs max_length (the length of a packed sequence)")
        if self.exact_match_samples < 0:
            out.append(f"exact_match_samples: must be >= 0, got {self.exact_match_samples}")
        out += chat_template_problems(self.chat_template, self.chat_template_path)
        for key in ("eos_token", "pad_token"):
            if getattr(self, key) == "":
                out.append(f"{key}: must be a token of the tokenizer or null, got ''")
        return out

    def data_settings(self, columns: Mapping[str, str] | None = None) -> DataSettings:
        return DataSettings(
            max_length=self.max_length,
            train_on=self.train_on,
            pair_template=self.pair_template,
            text_field=self.dataset_text_field,
            columns=dict(columns or {}),
            num_proc=self.dataset_num_proc,
            skip_invalid_rows=self.skip_invalid_rows,
            chat_template_kwargs=dict(self.chat_template_kwargs or {}),
            split_turns=self.split_turns,
            truncation_mode=self.truncation_mode,
        )


def to_sft_config(args: TrainingArguments | None, output_dir: str = "sftrainer_output") -> SFTConfig:
    """Accept ``SFTConfig``, a plain ``TrainingArguments`` (older TRL style) or None."""
    if args is None:
        return SFTConfig(output_dir=output_dir)
    if isinstance(args, SFTConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise ConfigError(f"args must be SFTConfig or TrainingArguments, got {type(args).__name__}")
    # Every field both classes share is copied: a trl.SFTConfig keeps its SFT settings. `args` already
    # ran __post_init__; fp16 there means the user asked for it, bf16 too.
    return SFTConfig(**sft_values_from(args, _init_fields(SFTConfig)))


# ---- model / data / LoRA sections -------------------------------------------------------------


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default="builtin", metadata={"help": "Model directory or hub id; 'builtin': the tiny demo model."}
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Dtype the weights load in and frozen ones (a LoRA base) keep: auto (the checkpoint's "
            "own), float32, bfloat16 or float16. Trained weights are always float32 master weights."
        },
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa, flash_attention_2, ..."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint (unsafe)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})

    def problems(self) -> list[str]:
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            return [
                f"model.dtype: must be one of {dtypes}, got {self.dtype!r}{did_you_mean(self.dtype, dtypes)}"
            ]
        return []


@dataclass
class DataConfig:
    train: str | list[str] = field(
        default="builtin",
        metadata={"help": "File(s), directory, glob or hub id (org/name); 'builtin': the demo tasks."},
    )
    eval: str | list[str] | None = field(
        default=None, metadata={"help": "Evaluation file(s) or hub id; 'builtin' for the demo."}
    )
    eval_split: float = field(
        default=0.0, metadata={"help": "Fraction of train held out for evaluation when eval is unset."}
    )
    split: str = field(
        default="train",
        metadata={
            "help": "Split of a hub dataset to train on (e.g. train_sft); slices like train[:1000] work."
        },
    )
    eval_split_name: str | None = field(
        default=None,
        metadata={
            "help": "Split to evaluate on (e.g. test_sft): of data.eval, or of data.train when eval is unset."
        },
    )
    subset: str | None = field(
        default=None, metadata={"help": "Subset (configuration) of a hub dataset: load_dataset's name."}
    )
    data_files: str | list[str] | dict[str, Any] | None = field(
        default=None, metadata={"help": "Files within a hub dataset to load: load_dataset's data_files."}
    )
    columns: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Rename columns: {their_name: prompt}."}
    )

    def problems(self) -> list[str]:
        if not 0.0 <= self.eval_split < 1.0:
            return [f"data.eval_split: must be in [0, 1), got {self.eval_split}"]
        if self.eval is not None and self.eval_split:
            return ["data.eval_split: set data.eval or data.eval_split, not both"]
        if self.eval_split_name is not None and self.eval_split:
            return ["data.eval_split: set data.eval_split (a fraction) or data.eval_split_name, not both"]
        return []

    def has_eval(self) -> bool:
        return self.eval is not None or bool(self.eval_split) or self.eval_split_name is not None

    def hub_args(self, eval: bool = False) -> dict[str, Any]:
        """``split`` / ``subset`` / ``data_files`` of ``sftrainer.data.load.load`` for train or eval.

        subset and data_files belong to data.train; eval shares them when it reads the same dataset.
        """
        if not eval:
            return {"split": self.split, "subset": self.subset, "data_files": self.data_files}
        same = self.eval is None or self.eval == self.train
        return {
            "split": self.eval_split_name,
            "subset": self.subset if same else None,
            "data_files": self.data_files if same else None,
        }


@dataclass
class LoraSettings:
    r: int = field(default=16, metadata={"help": "Rank of the LoRA update."})
    alpha: int = field(default=32, metadata={"help": "Scale: the update is multiplied by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "'all-linear' or module names."}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA."})
    bias: str = field(default="none", metadata={"help": "none, all or lora_only."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full (e.g. lm_head)."}
    )

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"lora.r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"lora.bias: must be none, all or lora_only, got {self.bias!r}")
        return out


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "lora": LoraSettings}


@dataclass
class RunConfig:
    """Everything one `sftrainer train` run needs."""

    train: SFTConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the merged YAML + overrides, as written


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}


def known_keys() -> list[str]:
    keys = list(_init_fields(SFTConfig))
    for section, cls in SECTIONS.items():
        keys += [section] + [f"{section}.{name}" for name in _init_fields(cls)]
    return keys


# ---- loading ------------------------------------------------------------------------------


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (``lora.r=32``; ``lora=null`` removes a section). Values are YAML."""
    out = copy.deepcopy(dict(config))  # nested overrides must not mutate the caller's dict
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"override '{item}': expected key=value")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[leaf] = value
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> RunConfig:
    """YAML file (or ``defaults``) + overrides -> a validated ``RunConfig``. Raises ``ConfigError``."""
    raw = dict(defaults or {})
    if path is not None:
        raw = read_yaml(path)
    raw = apply_overrides(raw, overrides)
    where = f"{path}: " if path is not None else ""
    return build_config(raw, where)


def build_config(raw: Mapping[str, Any], where: str = "") -> RunConfig:
    problems: list[str] = []
    train_values = _check_fields(SFTConfig, {k: v for k, v in raw.items() if k not in SECTIONS}, "", problems)
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        value = raw.get(name, {} if name != "lora" else None)
        if value is None:
            sections[name] = None
            continue
        if not isinstance(value, dict):
            problems.append(f"{name}: must be a mapping of keys, got {value!r}")
            continue
        sections[name] = _check_fields(cls, value, f"{name}.", problems)
    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        values = sections.get(name)
        if values is None:
            continue
        try:
            built[name] = cls(**values)
            problems += built[name].problems()
        except TypeError as err:
            problems.append(f"{name}: {err}")
    train_values.setdefault("output_dir", "outputs/run")
    # Built even when a section is wrong, so its problems are listed with the others.
    train = None
    try:
        train = SFTConfig(**train_values)
    except ConfigError as err:
        text = str(err).removeprefix("Invalid SFTConfig:")
        problems += [line.strip() for line in text.splitlines() if line.strip()]
    data = built.get("data", DataConfig())
    strategy = getattr(train, "eval_strategy", "no")
    if strategy != "no" and not data.has_eval():
        problems.append(
            f"eval_strategy: '{getattr(strategy, 'value', strategy)}' needs evaluation data; "
            "set data.eval, data.eval_split or data.eval_split_name, or eval_strategy: 'no'"
        )
    if problems:
        raise ConfigError(
            f"{where}{len(problems)} problem(s) in the configuration:\n"
            + "\n".join(f"  {p}" for p in problems)
        )
    model = built.get("model", ModelConfig())
    if train.trust_remote_code:  # TRL's top-level spelling of model.trust_remote_code
        model.trust_remote_code = True
    return RunConfig(
        train=train,
        model=model,
        data=data,
        lora=built.get("lora"),
        source=dict(raw),
    )


def _check_fields(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    fields = _init_fields(cls)
    hints = _type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in fields:
            problems.append(f"unknown key '{prefix}{key}'{did_you_mean(f'{prefix}{key}', known_keys())}")
            continue
        try:
            out[key] = coerce(value, hints.get(key, Any))
        except (TypeError, ValueError) as err:
            problems.append(f"{prefix}{key}: {err}")
    return out


def _type_hints(cls: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                hints.update(typing.get_type_hints(klass))
            except Exception:  # an unresolvable annotation in a dependency: skip type checks for it
                continue
    return hints
