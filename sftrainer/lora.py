"""LoRA / DoRA through PEFT: build the adapter config and wrap the model."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

from sftrainer.errors import ConfigError, did_you_mean

if TYPE_CHECKING:  # the `lora:` section is the run config's; only its fields are read here
    from sftrainer.run_config import LoraSettings

logger = logging.getLogger(__name__)


def peft_config_from(
    settings: LoraSettings | None, tokenizer: Any = None, model: Any = None
) -> LoraConfig | None:
    """The ``LoraConfig`` of a ``lora:`` section. ``tokenizer`` resolves ``trainable_tokens`` given as
    strings; ``model`` says where their rows are (see ``trainable_token_indices``)."""
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
        use_rslora=settings.use_rslora,
        # A str in LoraSettings (YAML); its problems() allows only these three values.
        bias=cast(Literal["none", "all", "lora_only"], settings.bias),
        modules_to_save=settings.modules_to_save,
        trainable_token_indices=trainable_token_indices(settings.trainable_tokens, tokenizer, model),
        task_type="CAUSAL_LM",
    )


def token_ids(tokens: Sequence[str | int], tokenizer: Any, key: str = "lora.trainable_tokens") -> list[int]:
    """Ids of ``tokens`` (token strings of ``tokenizer``, or ids), in order, without repeats."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    ids = []
    for token in tokens:
        if isinstance(token, int):
            ids.append(token)
            continue
        if tokenizer is None:
            raise ConfigError(f"{key}: {token!r} is a token string; give token ids, or the tokenizer")
        if token not in vocab:
            raise ConfigError(
                f"{key}: {token!r} is not one token of the tokenizer{did_you_mean(token, vocab)} (give tokens "
                "exactly as the vocabulary spells them, e.g. '<|im_end|>', or their ids)"
            )
        ids.append(vocab[token])
    return list(dict.fromkeys(ids))


def trainable_token_indices(
    tokens: Sequence[str | int] | None, tokenizer: Any, model: Any
) -> list[int] | dict[str, list[int]] | None:
    """PEFT's ``trainable_token_indices`` for ``tokens``: their rows of the input embeddings and, in a
    model whose output embeddings are not tied to them, of ``lm_head`` too, so that the model also
    learns to emit them (a tied lm_head follows the embeddings by itself)."""
    if not tokens:
        return None
    ids = token_ids(tokens, tokenizer)
    if model is None:
        return ids
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = embeddings.weight.shape[0]
    bad = [i for i in ids if not 0 <= i < rows]
    if bad:
        raise ConfigError(f"lora.trainable_tokens: ids {bad} are outside the embeddings' {rows} rows")
    names = {id(m): n for n, m in model.named_modules()}
    out = {names[id(embeddings)]: ids}
    if head is not None and head.weight is not embeddings.weight and id(head) in names:
        out[names[id(head)]] = ids
    return out


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
