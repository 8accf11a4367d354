"""Load a model and its tokenizer, and make the tokenizer ready for fine-tuning.

Safe by default: safetensors weights only, no remote code unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sftrainer import quant
from sftrainer.errors import ConfigError
from sftrainer.template_tokens import template_tokens

if TYPE_CHECKING:
    from transformers import AutoModelForImageTextToText

logger = logging.getLogger(__name__)

DTYPES: dict[str, str | torch.dtype] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

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


def load_processor(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """The processor (image processor + tokenizer + chat template) of a vision-language checkpoint."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise _from_pretrained_error("processor", name_or_path, err) from None


def is_vision_config(config: Any) -> bool:
    """A vision-language (image-text-to-text) model's config: loaded with its processor
    (``AutoModelForImageTextToText``), not as a causal LM (sftrainer.vision)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    kind = getattr(config, "model_type", None)
    return (
        kind in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        and getattr(config, "vision_config", None) is not None
    )


def is_vision_checkpoint(
    name_or_path: str, trust_remote_code: bool = False, revision: str | None = None
) -> bool:
    """Whether ``name_or_path`` holds a vision-language model (False when its config cannot be read)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError):
        return False
    return is_vision_config(config)


def auto_model_class(config: Any) -> Any:
    """The auto class that loads a checkpoint of this config for SFT."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


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
    _quantization_kwargs(kwargs)
    auto_class: type[AutoModelForCausalLM | AutoModelForImageTextToText] = AutoModelForCausalLM
    if is_vision_checkpoint(name_or_path, trust_remote_code, revision):
        from transformers import AutoModelForImageTextToText

        auto_class = AutoModelForImageTextToText  # a vision-language model (sftrainer.vision)
    try:
        model = auto_class.from_pretrained(
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
    if kwargs.get("quantization_config") is not None:
        logger.info("Quantized base: %s", quant.describe(kwargs["quantization_config"]))
    return model


def _quantization_kwargs(kwargs: dict[str, Any]) -> None:
    """Resolve quantization in ``from_pretrained`` kwargs, in place: a ``quantization_config`` mapping
    becomes a ``BitsAndBytesConfig``, and the older ``load_in_4bit`` / ``load_in_8bit`` keywords (in
    many TRL ``model_init_kwargs``; transformers 5 removed them) become one. ``ConfigError`` without
    bitsandbytes, naming the extra."""
    flags = {k: kwargs.pop(k) for k in ("load_in_4bit", "load_in_8bit") if k in kwargs}
    if any(flags.values()):
        if kwargs.get("quantization_config") is not None:
            raise ConfigError(f"set quantization_config or {', '.join(flags)}, not both")
        kwargs["quantization_config"] = {k: v for k, v in flags.items() if v}
    if kwargs.get("quantization_config") is None:
        return
    config = quant.to_bnb_config(kwargs["quantization_config"])
    kwargs["quantization_config"] = config
    if getattr(config, "load_in_8bit", False):
        quant.say_once_per_message("bitsandbytes.autograd._functions")


def default_chat_template(tokenizer: Any) -> str:
    """The default template, starting with BOS when this tokenizer puts BOS before text."""
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    return DEFAULT_CHAT_TEMPLATE.replace("{{ bos }}", "{{ bos_token }}" if adds_bos else "")


TEMPLATE_SUFFIXES = (".jinja", ".j2", ".txt", ".json")


def _is_template_path(value: str) -> bool:
    """A chat_template value that names a file: a template suffix, or no Jinja syntax at all."""
    one_line = len(value) < 4096 and "\n" not in value
    has_jinja = "{%" in value or "{{" in value
    return one_line and (value.lower().endswith(TEMPLATE_SUFFIXES) or not has_jinja)


def chat_template_problems(chat_template: str | None, chat_template_path: str | None) -> list[str]:
    """Problems of the chat_template / chat_template_path settings that show without loading anything."""
    out = []
    if chat_template and chat_template_path:
        out.append("chat_template_path: set chat_template or chat_template_path, not both")
    if chat_template and _is_template_path(chat_template) and not Path(chat_template).expanduser().is_file():
        out.append(
            f"chat_template: no such file: {chat_template} (give a path to a template file, or the "
            "Jinja text itself, with {% ... %} / {{ ... }})"
        )
    if chat_template_path:
        path = Path(chat_template_path).expanduser()
        if chat_template_path.lower().endswith((".jinja", ".j2")) and not path.is_file():
            out.append(f"chat_template_path: no such file: {chat_template_path}")
        elif path.is_file() and not chat_template_path.lower().endswith((".jinja", ".j2")):
            out.append(
                f"chat_template_path: {chat_template_path} is a file; give a .jinja / .j2 template or a "
                "tokenizer directory (chat_template takes other files)"
            )
        elif not path.exists() and _looks_like_path(chat_template_path):
            out.append(f"chat_template_path: no such tokenizer directory: {chat_template_path}")
    return out


def read_chat_template(value: str) -> str:
    """The template text of a ``chat_template`` setting: the Jinja text itself, or a file holding it
    (.jinja / .j2 / .txt, or a .json with a 'chat_template' key, as chat_template.json and
    tokenizer_config.json have). A path that does not exist is a ``ConfigError``, not a template."""
    if not _is_template_path(value):
        return value
    problems = chat_template_problems(value, None)
    if problems:
        raise ConfigError(problems[0])
    path = Path(value).expanduser()
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".json":
        return text
    try:
        template = json.loads(text).get("chat_template")
    except (json.JSONDecodeError, AttributeError):
        template = None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if not isinstance(template, str):
        raise ConfigError(f"chat_template: {value} has no 'chat_template' string")
    return template


def _template_from_tokenizer(source_path: str, tokenizer: Any) -> tuple[str, str | None, list[Any]]:
    """(template, eos token, tokens to add) of the tokenizer at ``source_path``, as TRL's
    ``clone_chat_template``: the tokens are those the template writes (and its EOS) that ``tokenizer``
    lacks (``sftrainer.template_tokens``)."""
    source = load_tokenizer(source_path)
    template = source.chat_template
    if isinstance(template, dict):
        template = template.get("default", next(iter(template.values()), None))
    if not template:
        raise ConfigError(f"chat_template_path: the tokenizer at {source_path} has no chat template")
    return template, source.eos_token, template_tokens(source, template, tokenizer)


def _check_in_vocab(key: str, token: str, tokenizer: Any) -> None:
    if token not in tokenizer.get_vocab():
        raise ConfigError(
            f"{key}: {token!r} is not in the tokenizer's vocabulary; use one of its tokens (tokens are added, "
            "and the embeddings grown, only for those a chat_template_path template needs)"
        )


def prepare_tokenizer(
    tokenizer: Any,
    chat_template: str | None = None,
    *,
    chat_template_path: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Any:
    """The tokenizer ready for fine-tuning, as a copy wherever something changes (the caller's is left
    alone): the chat template (``chat_template``: the text or a file; ``chat_template_path``: a .jinja
    file or a tokenizer directory / hub id, whose EOS token comes along, as in TRL), ``eos_token`` and
    ``pad_token`` overrides (tokens already in the vocabulary), and a pad token and a chat template
    where it has none (logged). Tokens a ``chat_template_path`` tokenizer's template writes that this
    tokenizer lacks are added (logged; the trainer grows the model's embeddings for them, see
    ``sftrainer.template_tokens``). Raises ``ConfigError`` for a missing file or an unknown token.
    """
    template: str | None = None
    template_eos: str | None = None
    source: str | None = None
    new_tokens: list[Any] = []
    if chat_template:
        template, source = read_chat_template(chat_template), "chat_template"
    elif chat_template_path:
        problems = chat_template_problems(None, chat_template_path)
        if problems:
            raise ConfigError(problems[0])
        source = "chat_template_path"
        if chat_template_path.lower().endswith((".jinja", ".j2")):
            template = Path(chat_template_path).expanduser().read_text(encoding="utf-8")
        else:
            template, template_eos, new_tokens = _template_from_tokenizer(chat_template_path, tokenizer)
    eos_token = eos_token or template_eos
    added = {t.content for t in new_tokens}
    for key, token in (("eos_token", eos_token), ("pad_token", pad_token)):
        if token is not None and token not in added:
            _check_in_vocab(key, token, tokenizer)
    if eos_token is None and tokenizer.eos_token is None:
        raise ConfigError(
            "the tokenizer has no eos_token; set eos_token (or tokenizer.eos_token) so the model can learn to stop"
        )
    changes = (
        bool(new_tokens)
        or (template is not None and template != tokenizer.chat_template)
        or (eos_token is not None and eos_token != tokenizer.eos_token)
        or (pad_token is not None and pad_token != tokenizer.pad_token)
        or tokenizer.pad_token is None
        or not tokenizer.chat_template
    )
    if not changes:
        return tokenizer
    # A deep copy: a shallow one shares the special-token map, so setting pad_token on it would set
    # the caller's too (transformers 5.x). About 0.3 s for a 150k-token vocabulary, once.
    tokenizer = copy.deepcopy(tokenizer)
    if new_tokens:
        tokenizer.add_tokens(new_tokens)
        logger.warning(
            "chat_template_path: added %d tokens the template of %s uses to the tokenizer: %s (the model's "
            "embeddings get rows for them, which train)",
            len(new_tokens),
            chat_template_path,
            ", ".join(t.content for t in new_tokens),
        )
    if template is not None:
        tokenizer.chat_template = template
        where = chat_template_path or (chat_template if _is_template_path(chat_template or "") else "<text>")
        logger.info("Chat template from %s: %s", source, where)
    if eos_token is not None and eos_token != tokenizer.eos_token:
        logger.info("EOS token for training: %r (the tokenizer's was %r)", eos_token, tokenizer.eos_token)
        tokenizer.eos_token = eos_token
    if pad_token is not None:
        tokenizer.pad_token = pad_token
    elif tokenizer.pad_token is None:
        # Padding is masked by attention_mask and labels, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
    if not tokenizer.chat_template:
        tokenizer.chat_template = default_chat_template(tokenizer)
        logger.info(
            "The tokenizer has no chat template; using sftrainer's default "
            "('### User:' / '### Assistant:' headers, the assistant turn ending with EOS %r)",
            tokenizer.eos_token,
        )
    return tokenizer
