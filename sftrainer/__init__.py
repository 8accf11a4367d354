"""sftrainer: supervised fine-tuning of causal language models.

from sftrainer import SFTTrainer, SFTConfig   # drop-in for `from trl import SFTTrainer, SFTConfig`

The public names are imported on first use, so ``import sftrainer`` (and ``sftrainer --help``) does
not import torch, transformers or datasets.

Layers, bottom to top. A module imports only from its own layer or below, and there are no import cycles
(imports inside functions count; type-only imports under ``TYPE_CHECKING`` do not, they never run);
``tests/test_layers.py`` reads this table and checks both.

L0  constants, errors, version, notices, coerce, compat, timing, console, png, metrics, memory  — foundation: choices, error classes, small helpers
L1  data.*  — pure data functions: load, formats, render and locate turns, tokenize, pack, collate
L2  vision, vision.images, vision.processor, vision.encode, vision.pack, vision.collate, vision.builtin  — the image strategy of the data layer
L3  loss, isolation, precision, sharding, quant, lora, template_tokens, model, nonfinite, evaluate, memory_estimate, builtin  — mechanisms: each decides one thing once
L3  checkpoint, run, run_dir, tracking, distributed  — a run on disk and its processes: checkpoints, the finished run, who goes first
L4  vision.model, vision.probe  — the model side of vision: adapting a VLM, its isolation probe
L5  config, run_config  — the typed configuration (SFTConfig, the YAML run), validated in one place
L6  setup, pipeline, sources, generation_eval, trainer_args, trainer_data  — what the trainer is built from: processing class, model, the one data pipeline, the trainer's arguments and data inputs
L7  trainer  — SFTTrainer: a constructor that is a list of named steps, and the overrides training needs
L8  train, preflight, preview, generate, export, gguf_vocab, gguf_export, gguf_lora, serve_export, ollama, eval_run, report, launch, config_help  — the commands: one library function each
L9  cli, __main__, sftrainer  — entry points: parse arguments, call one command
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from sftrainer.constants import IGNORE_INDEX
from sftrainer.errors import ConfigError, DataError, SFTrainerError
from sftrainer.notices import install as _install_notice_filters
from sftrainer.version import __version__ as __version__

if TYPE_CHECKING:
    from sftrainer.config import SFTConfig
    from sftrainer.data.collate import DataCollatorForLanguageModeling
    from sftrainer.run_config import RunConfig, load_config
    from sftrainer.train import train
    from sftrainer.trainer import SFTTrainer

__all__ = [
    "IGNORE_INDEX",
    "ConfigError",
    "DataCollatorForLanguageModeling",
    "DataError",
    "RunConfig",
    "SFTConfig",
    "SFTTrainer",
    "SFTrainerError",
    "load_config",
    "train",
]

_LAZY = {
    "DataCollatorForLanguageModeling": "sftrainer.data.collate",
    "RunConfig": "sftrainer.run_config",
    "SFTConfig": "sftrainer.config",
    "load_config": "sftrainer.run_config",
    "train": "sftrainer.train",
    "SFTTrainer": "sftrainer.trainer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sftrainer' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Importing the submodule sftrainer.train sets the package attribute `train` to that module;
        # the public `sftrainer.train` is the function (as it was when this file imported it eagerly).
        if name == "train" and isinstance(value, types.ModuleType) and value.__name__ == "sftrainer.train":
            value = value.train
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


_install_notice_filters()  # known third-party import-time notices: DEBUG only (sftrainer.notices)
