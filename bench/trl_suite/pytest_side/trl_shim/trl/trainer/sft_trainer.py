"""See ``trl/__init__.py``."""

from sftrainer import DataCollatorForLanguageModeling, SFTConfig, SFTTrainer

__all__ = ["DataCollatorForLanguageModeling", "SFTConfig", "SFTTrainer"]
