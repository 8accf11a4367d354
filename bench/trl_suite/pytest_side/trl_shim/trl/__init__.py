"""A stand-in for the ``trl`` package while TRL's test file runs against sftrainer.

TRL's ``tests/test_sft_trainer.py`` imports ``SFTConfig`` and ``SFTTrainer`` from ``trl`` and
``DataCollatorForLanguageModeling`` from ``trl.trainer.sft_trainer``; here they are sftrainer's
public classes. Nothing else is provided: a test that needs more of TRL fails to import, visibly.
"""

from sftrainer import SFTConfig, SFTTrainer

__all__ = ["SFTConfig", "SFTTrainer"]
