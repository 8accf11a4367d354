"""sftrainer: supervised fine-tuning of causal language models.

from sftrainer import SFTTrainer, SFTConfig   # drop-in for `from trl import SFTTrainer, SFTConfig`

The public names are imported on first use, so ``import sftrainer`` (and ``sftrainer --help``) does
not import torch, transformers or datasets.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

from sftrainer.constants import IGNORE_INDEX
from sftrainer.errors import ConfigError, DataError, SFTrainerError

if TYPE_CHECKING:
    from sftrainer.config import SFTConfig
    from sftrainer.data.collate import DataCollatorForLanguageModeling
    from sftrainer.run_config import RunConfig, load_config
    from sftrainer.train import train
    from sftrainer.trainer import SFTTrainer

__version__ = "0.1.0"
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


class _DemoteBitsandbytesKernelNotice(logging.Filter):
    """bitsandbytes (0.45 to 0.50, backends/cpu/ops.py) tries, when it is imported on a CPU with
    AVX512-BF16, to load a CPU kernel from the Hugging Face Hub through the `kernels` package (which
    transformers 5.25 installs), and logs a WARNING when that fails: "Failed to load CPU
    gemm_4bit_forward ..." (no `kernels`, no network, or a publisher it does not trust); offline,
    `kernels` also warns "Skipping publisher trust check for 'kernels-community/...bitsandbytes'".
    peft imports bitsandbytes whenever it is installed (peft/helpers.py, reached through
    transformers.trainer_utils), so every command printed them. They are fallback notices, not
    problems: shown at DEBUG (SFTRAINER_LOG_LEVEL=DEBUG), these messages only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(self.prefix):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


for _logger, _prefix in (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit"),
    (
        "kernels._internals.hf_hub",
        "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
    ),
):
    logging.getLogger(_logger).addFilter(_DemoteBitsandbytesKernelNotice(_prefix))
del _logger, _prefix
