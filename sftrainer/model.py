"""Load a model and its tokenizer, and make the tokenizer ready for fine-tuning.

Safe by default: safetensors weights only, no remote code unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sftrainer.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Used when a tokenizer has no chat template of its own. Plain-text headers, so any tokenizer can
# render it; the assistant turn ends with EOS, which is trained, so the model learns to stop.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- else -%}{{ '### ' + message['role'] | capitalize + ':\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def _from_pretrained_error(what: str, name: str, err: Exception) -> ConfigError:
    if os.path.isdir(name):
        hint = "the directory exists but does not hold a loadable checkpoint"
    elif _looks_like_path(name):
        hint = "no such directory"
    else:
        hint = "it is not a local directory, and it could not be fetched from the Hugging Face Hub"
    return ConfigError(f"cannot load the {what} '{name}': {hint}. ({type(err).__name__}: {err})")


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else can only be a local path."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\")) or name.count("/") > 1


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    try:
        return AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise _from_pretrained_error("tokenizer", name_or_path, err) from None


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """``from_pretrained`` in the checkpoint's own dtype unless told otherwise; safetensors only.

    ``dtype`` is the dtype the weights are loaded in, which frozen weights (a LoRA base) keep; the
    trainer makes trainable weights fp32 master weights (``precision.keep_master_weights``).
    """
    torch_dtype = kwargs.pop("torch_dtype", None)  # the older spelling, in many TRL model_init_kwargs
    if dtype is None:
        dtype = torch_dtype if torch_dtype is not None else "auto"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    kwargs.setdefault("use_safetensors", True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise _from_pretrained_error("model", name_or_path, err) from None
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "Loaded %s: %s, %.1fM parameters, %s", name_or_path, type(model).__name__, n_params / 1e6, model.dtype
    )
    return model


def default_chat_template(tokenizer: Any) -> str:
    """The default template, starting with BOS when this tokenizer puts BOS before text."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    return DEFAULT_CHAT_TEMPLATE.replace("{{ bos }}", "{{ bos_token }}" if adds_bos else "")


def prepare_tokenizer(tokenizer: Any, chat_template: str | None = None) -> Any:
    """Give the tokenizer a pad token and a chat template if it lacks them (logged)."""
    if tokenizer.eos_token is None:
        raise ConfigError(
            "the tokenizer has no eos_token; set tokenizer.eos_token so the model can learn to stop"
        )
    if tokenizer.pad_token is None:
        # Padding is masked by attention_mask and labels, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
    if chat_template:
        path = Path(chat_template)
        is_file = len(chat_template) < 4096 and "{" not in chat_template and path.is_file()
        tokenizer.chat_template = path.read_text(encoding="utf-8") if is_file else chat_template
    elif not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template(tokenizer)
        logger.info(
            "The tokenizer has no chat template; using sftrainer's default "
            "('### User:' / '### Assistant:' headers, the assistant turn ending with EOS %r)",
            tokenizer.eos_token,
        )
    return tokenizer
