"""A run described by one YAML file: ``SFTConfig`` fields at the top level, plus the sections
``model``, ``data`` and ``lora``; command-line overrides use the same names (``lora.r=32``). Unknown
keys and bad values are all reported at once, each by the name the user wrote, before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import sftrainer.quant as quant
import sftrainer.sharding as sharding
from sftrainer.coerce import coerce, init_fields
from sftrainer.config import INTERVALS, SFTConfig
from sftrainer.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

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
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the frozen base in 4 bits (QLoRA; needs a lora: section and sftrainer[quant])."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the frozen base in 8 bits, LLM.int8 (needs a lora: section and sftrainer[quant])."
        },
    )
    bnb_4bit_quant_type: str | None = field(
        default=None, metadata={"help": "4-bit data type: nf4 (default) or fp4."}
    )
    bnb_4bit_use_double_quant: bool | None = field(
        default=None,
        metadata={
            "help": "Quantize the 4-bit quantization constants too (default true; ~0.4 bit/weight less)."
        },
    )
    bnb_4bit_compute_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Dtype 4-bit layers compute in: auto (default: bfloat16 on an accelerator that supports "
            "it, else float32), float32, bfloat16 or float16."
        },
    )
    quantization_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "transformers BitsAndBytesConfig arguments, instead of the keys above."},
    )

    def problems(self) -> list[str]:
        dtypes = ("auto", "float32", "bfloat16", "float16")
        out = []
        if self.dtype not in dtypes:
            out.append(
                f"model.dtype: must be one of {dtypes}, got {self.dtype!r}{did_you_mean(self.dtype, dtypes)}"
            )
        out += quant.settings_problems(
            self.load_in_4bit,
            self.load_in_8bit,
            self.bnb_4bit_quant_type,
            self.bnb_4bit_use_double_quant,
            self.bnb_4bit_compute_dtype,
            self.quantization_config,
        )
        return out

    @property
    def quantized(self) -> bool:
        """Whether the base is loaded quantized (4-bit or 8-bit)."""
        return self.load_in_4bit or self.load_in_8bit or self.quantization_config is not None

    def init_kwargs_clashes(self, init: Mapping[str, Any]) -> list[str]:
        """Keys of TRL's ``model_init_kwargs`` that repeat a setting of this section."""
        mine = {
            "dtype": self.dtype != "auto",
            "torch_dtype": self.dtype != "auto",
            "attn_implementation": self.attn_implementation is not None,
            "revision": self.revision is not None,
            "quantization_config": self.quantized,
            "load_in_4bit": self.quantized,
            "load_in_8bit": self.quantized,
        }
        return [k for k in init if mine.get(k)]

    def load_kwargs(self, model_init_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments of ``model.load_model``: this section, plus TRL's ``model_init_kwargs``
        (a top-level YAML key) for what the section leaves unset."""
        kwargs: dict[str, Any] = dict(model_init_kwargs or {})
        kwargs.setdefault(
            "dtype", kwargs.pop("torch_dtype", self.dtype) if self.dtype == "auto" else self.dtype
        )
        kwargs.pop("torch_dtype", None)
        kwargs["trust_remote_code"] = self.trust_remote_code or bool(kwargs.get("trust_remote_code"))
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        if self.revision is not None:
            kwargs["revision"] = self.revision
        if self.quantized:
            kwargs["quantization_config"] = self.bnb_config()
        return kwargs

    def bnb_config(self) -> Any:
        """The ``BitsAndBytesConfig`` these settings describe, or None (see ``sftrainer.quant``)."""
        return quant.model_bnb_config(
            load_in_4bit=self.load_in_4bit,
            load_in_8bit=self.load_in_8bit,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=self.bnb_4bit_compute_dtype,
            quantization_config=self.quantization_config,
        )


@dataclass
class DataConfig:
    train: str | list[str | dict[str, Any]] = field(
        default="builtin",
        metadata={
            "help": "File(s), directory, glob or hub id (org/name); 'builtin': the demo tasks. A list of "
            "mappings is a mixture: each {path, weight or rows, split, subset, data_files, columns}."
        },
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
    revision: str | None = field(
        default=None,
        metadata={"help": "Revision (branch, tag or commit) of a hub dataset: load_dataset's revision."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read data.train as a stream (data larger than memory): tokenized and packed on the fly; "
            "needs max_steps."
        },
    )

    def problems(self) -> list[str]:
        if self.streaming and self.is_mixture():
            return ["data.streaming: a mixture samples rows from each source and needs map-style data"]
        if self.streaming and self.eval_split:
            return ["data.eval_split: a stream cannot hold rows out; set data.eval (read without streaming)"]
        if self.is_mixture():
            from sftrainer.data.mixture import spec_problems  # datasets is imported only when needed

            out = [p for i, spec in enumerate(self.train) for p in spec_problems(spec, f"data.train[{i}]")]
            if self.eval_split:
                out.append(
                    "data.eval_split: a mixture has no single data set to hold rows out of; set data.eval"
                )
            if self.eval is None and self.eval_split_name is not None:
                out.append(
                    "data.eval_split_name: with a mixture in data.train, name the eval data in data.eval"
                )
            if out:
                return out
        if not 0.0 <= self.eval_split < 1.0:
            return [f"data.eval_split: must be in [0, 1), got {self.eval_split}"]
        if self.eval is not None and self.eval_split:
            return ["data.eval_split: set data.eval or data.eval_split, not both"]
        if self.eval_split_name is not None and self.eval_split:
            return ["data.eval_split: set data.eval_split (a fraction) or data.eval_split_name, not both"]
        return []

    def is_mixture(self) -> bool:
        """data.train lists sources as mappings (path + weight / rows / ...): see sftrainer.data.mixture."""
        return isinstance(self.train, list) and any(isinstance(s, dict) for s in self.train)

    def mixture_sources(self) -> list[Any]:
        """The ``MixtureSource`` of each data.train entry; split, subset, data_files and columns
        default to the data: keys of the same name. Paths are not loaded yet."""
        from sftrainer.data.mixture import MixtureSource

        specs: list[dict[str, Any]] = [s if isinstance(s, dict) else {"path": s} for s in self.train]
        return [
            MixtureSource(
                data=spec["path"],
                weight=spec.get("weight"),
                rows=spec.get("rows"),
                columns=spec.get("columns") or self.columns,
                split=spec.get("split", self.split),
                subset=spec.get("subset", self.subset),
                data_files=spec.get("data_files", self.data_files),
            )
            for spec in specs
        ]

    def has_eval(self) -> bool:
        return self.eval is not None or bool(self.eval_split) or self.eval_split_name is not None

    def hub_args(self, eval: bool = False) -> dict[str, Any]:
        """``split`` / ``subset`` / ``data_files`` / ``revision`` (+ ``streaming`` for train) of
        ``sftrainer.data.load.load``. subset, data_files and revision belong to data.train; eval shares
        them when it reads the same dataset. Eval data is never streamed (its rows are counted).
        """
        if not eval:
            return {
                "split": self.split,
                "subset": self.subset,
                "data_files": self.data_files,
                "revision": self.revision,
                "streaming": self.streaming,
            }
        same = self.eval is None or self.eval == self.train
        return {
            "split": self.eval_split_name,
            "subset": self.subset if same else None,
            "data_files": self.data_files if same else None,
            "revision": self.revision if same else None,
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
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."},
    )
    trainable_tokens: list[int | str] | None = field(
        default=None,
        metadata={
            "help": "Tokens (strings, or ids) whose embedding rows are trained, e.g. chat-template tokens "
            "the base never trained; the rest of the embeddings stays frozen."
        },
    )

    def problems(self) -> list[str]:
        out = []
        if self.r < 1:
            out.append(f"lora.r: must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.bias not in ("none", "all", "lora_only"):
            out.append(f"lora.bias: must be none, all or lora_only, got {self.bias!r}")
        if self.trainable_tokens is not None and not self.trainable_tokens:
            out.append("lora.trainable_tokens: an empty list trains nothing; give tokens or remove the key")
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


def known_keys() -> list[str]:
    keys = list(init_fields(SFTConfig))
    for section, cls in SECTIONS.items():
        keys += [section] + [f"{section}.{name}" for name in init_fields(cls)]
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
    below = raw
    raw = apply_overrides(raw, overrides)
    _steps_over_strategies(raw, below, overrides, str(path) if path is not None else "the built-in config")
    where = f"{path}: " if path is not None else ""
    return build_config(raw, where, overrides)


def _steps_over_strategies(
    raw: dict[str, Any], below: Mapping[str, Any], overrides: Sequence[str], source: str
) -> None:
    """A ``save_steps`` / ``eval_steps`` / ``logging_steps`` given on the command line without its
    strategy turns the strategy that the YAML file (or the built-in demo config) set to 'steps', as
    ``SFTConfig`` does with a strategy left at its default (``config.resolve_intervals``): the
    command line is what the user asked last. Said in the log."""
    named = {item.partition("=")[0] for item in overrides}
    for strategy_key, steps_key, doing in INTERVALS:
        before = below.get(strategy_key)
        before = "no" if before is False else before  # YAML 1.1 reads an unquoted `no` as false
        if steps_key not in named or strategy_key in named or raw.get(steps_key) is None:
            continue
        if before is not None and before != "steps":
            raw[strategy_key] = "steps"
            logger.info(
                "%s=%s on the command line: %s set to 'steps' (%s sets '%s'), to %s every %s steps",
                steps_key, raw[steps_key], strategy_key, source, before, doing, raw[steps_key],
            )  # fmt: skip


def build_config(raw: Mapping[str, Any], where: str = "", overrides: Sequence[str] = ()) -> RunConfig:
    """``raw`` (the YAML mapping with ``overrides`` applied) -> a validated ``RunConfig``. ``where``
    ("my.yaml: ") names the file in the error; a problem with a key the command line set names the
    override instead."""
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
    if train is not None and strategy != "no" and not data.has_eval():
        implied = "eval_strategy" in getattr(train, "_implied", ())
        problems.append(
            f"eval_strategy: '{getattr(strategy, 'value', strategy)}'"
            + (f" (set by eval_steps={train.eval_steps})" if implied else "")
            + " needs evaluation data; set data.eval, data.eval_split or data.eval_split_name, or "
            + ("remove eval_steps" if implied else "eval_strategy: 'no'")
        )
    if data.streaming and train is not None and train.max_steps <= 0:
        problems.append(
            "data.streaming: a stream has no length, so the run cannot count its steps from epochs; "
            "set max_steps (the optimizer steps to train)"
        )
    model_cfg = built.get("model")
    init = getattr(train, "model_init_kwargs", None) or {}
    if model_cfg is not None:
        problems += [
            f"model_init_kwargs.{k}: the model: section sets it too; set it in one place"
            for k in model_cfg.init_kwargs_clashes(init)
        ]
    quant_keys = ("load_in_4bit", "load_in_8bit", "quantization_config")
    quantized_by = [f"model.{k}" for k in quant_keys if getattr(model_cfg, k, None)]
    quantized_by += [f"model_init_kwargs.{k}" for k in quant_keys if init.get(k)]
    if quantized_by and "lora" in sections and sections["lora"] is None:
        problems.append(
            f"{quantized_by[0]}: a quantized base cannot be fine-tuned in full (its 4-bit / 8-bit weights "
            "cannot be updated); add a lora: section to train a LoRA adapter on it (QLoRA), or load the "
            "model unquantized"
        )
    if model_cfg is not None and train is not None and not problems:
        mapping = model_cfg.quantization_config or {}
        problems += sharding.quantized_problems(
            train,
            model_cfg.dtype,
            mapping.get("bnb_4bit_quant_storage"),
            four_bit=bool(model_cfg.load_in_4bit or mapping.get("load_in_4bit")),
        )
    if problems:
        raise ConfigError(_problems_message(problems, where, overrides))
    assert train is not None  # SFTConfig raised: its problems were raised above
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


# The key a problem is about: "unknown key 'lora.rank' ..." or "lora.r: must be >= 1 ...".
_PROBLEM_KEY = re.compile(r"unknown key '([^']+)'|([A-Za-z_][\w.]*):")


def _problems_message(problems: Sequence[str], where: str, overrides: Sequence[str]) -> str:
    """The error listing ``problems``: each one about a key given on the command line names that
    override (``command line override `max_stpes=30`: unknown key ...``); the header names the file,
    the command line, or both, as the problems come from them."""
    given = {item.partition("=")[0]: item for item in overrides}
    lines, from_command_line = [], 0
    for problem in problems:
        override = _override_of(problem, given)
        if override is not None:
            from_command_line += 1
            problem = f"command line override `{override}`: {problem}"
        lines.append(f"  {problem}")
    named = [where.removesuffix(": ")] if where and from_command_line < len(problems) else []
    named += ["the command line"] if from_command_line else []
    header = f"{' and '.join(named)}: " if named else ""
    return f"{header}{len(problems)} problem(s) in the configuration:\n" + "\n".join(lines)


def _override_of(problem: str, given: Mapping[str, str]) -> str | None:
    """The ``key=value`` item that set the key ``problem`` is about (or a section above it), if any."""
    match = _PROBLEM_KEY.match(problem)
    if match is None:
        return None
    parts = (match.group(1) or match.group(2)).split(".")
    keys = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
    return next((given[k] for k in keys if k in given), None)


def _check_fields(cls: type, values: Mapping[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    fields = init_fields(cls)
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
