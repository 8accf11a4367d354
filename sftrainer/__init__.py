"""sftrainer: supervised fine-tuning of causal language models.

from sftrainer import SFTTrainer, SFTConfig   # drop-in for `from trl import SFTTrainer, SFTConfig`
"""

from sftrainer.config import RunConfig, SFTConfig, load_config
from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.collate import DataCollatorForLanguageModeling
from sftrainer.errors import ConfigError, DataError, SFTrainerError
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
