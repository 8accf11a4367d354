"""Build what a trainer needs: the processing class and the model for training.

Contract:

- The processing class is a tokenizer, or for a vision-language model its processor (image processor
  + tokenizer + chat template). ``load_processing_class`` is the one place that decides which, by the
  model's checkpoint; ``prepare_processing_class`` makes either ready for fine-tuning (chat template,
  EOS / pad tokens; ``model.prepare_tokenizer`` / ``vision.prepare_processor``), as a copy wherever
  something changes. ``training_processing_class`` does both for a trainer (loading at the revision
  the model was loaded at) and gives new chat-template tokens rows in the model that train.
  ``inference_processing_class`` loads a finished run's, ready to prompt.
- The model for training: ``load_training_model`` loads a path (``model_init_kwargs``,
  ``quantization_config``); ``model_for_training`` adapts it: seeding before LoRA draws its matrices,
  a vision-language model's frozen tower, LoRA, the quantization checks and layout, fp32 master
  weights. Each step logs or raises by the key the user wrote; the order is the order they run in.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import set_seed
from transformers.trainer_utils import align_special_tokens

from sftrainer import lora, precision, quant, sharding, template_tokens
from sftrainer.errors import ConfigError, warn_caller
from sftrainer.model import (
    default_chat_template,
    is_vision_checkpoint,
    load_model,
    load_processor,
    load_tokenizer,
    prepare_tokenizer,
)
from sftrainer.vision.model import adapt_for_training, is_vision_model, prepare_processor
from sftrainer.vision.processor import is_processor

# The loggers these lines were written under before this module existed: the CLI prints the name.
trainer_logger = logging.getLogger("sftrainer.trainer")
generate_logger = logging.getLogger("sftrainer.generate")


# ---- the processing class ----------------------------------------------------------------------


def load_processing_class(
    name_or_path: str,
    trust_remote_code: bool = False,
    revision: str | None = None,
    *,
    vision: bool | None = None,
    model_path: str | None = None,
) -> Any:
    """The tokenizer at ``name_or_path``, or the processor where the model is a vision-language one:
    ``vision`` if given, else decided by the checkpoint at ``model_path`` (default ``name_or_path``)."""
    if vision is None:
        vision = is_vision_checkpoint(model_path or name_or_path, trust_remote_code, revision)
    load = load_processor if vision else load_tokenizer
    return load(name_or_path, trust_remote_code, revision)


def prepare_processing_class(processing_class: Any, args: Any) -> Any:
    """The tokenizer or processor ready for fine-tuning by ``args``' ``chat_template``,
    ``chat_template_path``, ``eos_token`` and ``pad_token``: a copy where it changes."""
    prepare = prepare_processor if is_processor(processing_class) else prepare_tokenizer
    return prepare(
        processing_class,
        args.chat_template,
        chat_template_path=args.chat_template_path,
        eos_token=args.eos_token,
        pad_token=args.pad_token,
    )


def training_processing_class(
    model: Any, processing_class: Any, args: Any, peft_config: Any, callers_model: bool
) -> tuple[Any, Any]:
    """(processing class, peft_config) for training ``model``: loaded from where the model came from if
    not given (at the revision it was loaded at), prepared (the caller's stays as it was), tokens a
    ``chat_template_path`` template brought given trained embedding rows, and the model's config and
    generation config taking the EOS / pad / BOS training uses."""
    if processing_class is None:
        revision = (args.model_init_kwargs or {}).get("revision") if not callers_model else None
        processing_class = load_processing_class(
            _model_path(model), args.trust_remote_code, revision, vision=is_vision_model(model)
        )
    given = processing_class
    processing_class = prepare_processing_class(processing_class, args)
    if processing_class is not given and not is_processor(processing_class):
        # Tokens a chat_template_path template brought: rows in the model, trained.
        new_ids = template_tokens.new_token_ids(given, processing_class)
        template_tokens.grow_embeddings(model, processing_class, new_ids, callers_model)
        peft_config = template_tokens.trainable_rows(model, peft_config, processing_class, new_ids)
    # The model's config and generation config take the EOS / pad / BOS training uses (as TRL), now
    # rather than when Trainer.train() would (and report it as a change the user did not make).
    align_special_tokens(model, processing_class)
    return processing_class, peft_config


def inference_processing_class(
    path: str, model_path: str, trust_remote_code: bool = False, name: str | None = None
) -> Any:
    """The tokenizer or processor saved at ``path`` (a run directory), ready to prompt the model at
    ``model_path``: a processor prepared, a tokenizer without a chat template given sftrainer's
    default (warned about, naming ``name``, default ``path``)."""
    if is_vision_checkpoint(model_path, trust_remote_code):  # the processor saved with the run
        return prepare_processor(load_processor(path, trust_remote_code))
    tokenizer = load_tokenizer(path, trust_remote_code)
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template(tokenizer)
        generate_logger.warning("%s has no chat template; using sftrainer's default", name or path)
    return tokenizer


def _model_path(model: Any) -> str:
    path = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    if not path:
        raise ValueError(
            "pass processing_class= (the tokenizer): the model does not say where it was loaded from"
        )
    return path


# ---- the model for training --------------------------------------------------------------------


def load_training_model(model: Any, args: Any, quantization_config: Any = None) -> Any:
    """``model`` itself, or the model at a path loaded with ``args.model_init_kwargs`` and
    ``quantization_config`` (given twice: ``ConfigError``; for a loaded model: ignored, with a warning)."""
    if not isinstance(model, str):
        if quantization_config is not None:
            warn_caller(
                "quantization_config is ignored: the model is already loaded (pass a path to load it quantized)"
            )
        return model
    init_kwargs = {"trust_remote_code": args.trust_remote_code, **(args.model_init_kwargs or {})}
    if quantization_config is not None:
        if "quantization_config" in init_kwargs:
            raise ConfigError("quantization_config is given twice: as an argument and in model_init_kwargs")
        init_kwargs["quantization_config"] = quantization_config
    return load_model(model, **init_kwargs)


def model_for_training(model: Any, args: Any, peft_config: Any, callers_model: bool) -> Any:
    """The model as it trains: a vision-language model's tower and projector frozen unless asked, LoRA
    (``peft_config``), a quantized base checked and laid out for training, fp32 master weights under
    bf16 / fp16 (a copy of the caller's model where they change)."""
    if peft_config is not None:
        # LoRA's A matrices are drawn at random here, before Trainer.__init__ seeds torch: without
        # this, two trainers built in one process start from different adapters whatever `seed` says.
        set_seed(args.seed)
    if is_vision_model(model):  # the language model trains; the vision tower and projector unless asked
        peft_config = adapt_for_training(model, peft_config, args.train_projector, args.train_vision_tower)
    model = lora.apply(model, peft_config, gradient_checkpointing=bool(args.gradient_checkpointing))
    quant.check_trainable(model)  # a 4-bit / 8-bit base trains only through an adapter
    quant.keep_training_layout(model)  # bitsandbytes' CPU inference layout has no backward
    if sharding.is_partitioned(model):
        # ZeRO-3 partitioned the weights as they loaded (each parameter holds an empty placeholder)
        # and its optimizer keeps fp32 master copies itself under bf16 / fp16.
        trainer_logger.info("DeepSpeed ZeRO-3 keeps the master weights: their dtypes are left as loaded")
        return model
    return precision.keep_master_weights(model, args.bf16 or args.fp16, callers_model)
