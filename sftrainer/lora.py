"""LoRA / DoRA through PEFT: build the adapter config and wrap the model."""

from __future__ import annotations

import logging
from typing import Any

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from sftrainer.config import LoraSettings

logger = logging.getLogger(__name__)


def peft_config_from(settings: LoraSettings | None) -> LoraConfig | None:
    if settings is None:
        return None
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
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
        raise ValueError("the model already has a PEFT adapter; pass peft_config=None to train it as it is")
    if gradient_checkpointing:
        # Checkpointed blocks need an input that requires grad, or frozen embeddings cut the graph.
        model.enable_input_require_grads()
    model = get_peft_model(model, peft_config)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info(
        "LoRA: %s trainable parameters of %s (%.2f%%)",
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / total,
    )
    return model
