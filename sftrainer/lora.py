"""LoRA / DoRA through PEFT: build the adapter config and wrap the model."""

from __future__ import annotations

import logging
import warnings
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from sftrainer.errors import ConfigError
from sftrainer.run_config import LoraSettings

logger = logging.getLogger(__name__)


def peft_config_from(settings: LoraSettings | None) -> LoraConfig | None:
    if settings is None:
        return None
    targets = settings.target_modules
    if isinstance(targets, str) and targets.isidentifier():
        # PEFT reads a string as a regex over full module paths, so "q_proj" would match nothing.
        targets = [targets]
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        use_dora=settings.use_dora,
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        task_type="CAUSAL_LM",
    )


def apply(model: Any, peft_config: PeftConfig | None, gradient_checkpointing: bool = False) -> Any:
    """Wrap ``model`` with a PEFT adapter when a config is given; report what is trainable."""
    if peft_config is None:
        return model
    if isinstance(model, PeftModel):
        raise ConfigError(
            "the model already has a PEFT adapter and peft_config asks for another one: pass "
            "peft_config=None to train the existing adapter, or pass the base model with peft_config"
        )
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or frozen embeddings cut the graph.
        model.enable_input_require_grads()
    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.x: a
        # FutureWarning the user can do nothing about.
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA: %s trainable parameters of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model
