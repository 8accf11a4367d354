"""Vision-language models: their processor made ready, what trains, and which families can pack.

- ``prepare_processor``: the checkpoint's processor (image processor + tokenizer + chat template;
  ``model.load_processor`` loads it) made ready as ``model.prepare_tokenizer`` makes a tokenizer
  ready, as a copy wherever something changes.
- ``adapt_for_training``: the language model trains, the vision tower and the projector stay frozen
  unless ``train_vision_tower`` / ``train_projector`` say otherwise. Full fine-tuning freezes them in
  place; LoRA gets a copy of the ``LoraConfig`` whose ``target_modules`` match the language model's
  layers only (PEFT's ``all-linear`` would also adapt every linear layer of the vision tower), with
  the projector in ``modules_to_save`` when it trains.
- ``packing_problem``: packing and padding-free batches for families whose rows can be kept apart by
  ``position_ids`` (``vision.probe.check_isolation`` checks it on the model with images before
  training); families that compute their positions from the batch's image layout are refused.

With ``probe.py`` (which asks ``packing_problem``), the part of the package on the model layer: it
imports ``sftrainer.model``; the data-side modules (images, processor, encode, collate, prepare) never
import it.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from typing import Any

import torch

from sftrainer.constants import (
    LANGUAGE_MODEL_NAMES,
    PROJECTOR_NAMES,
    VISION_TOWER_NAMES,
)
from sftrainer.errors import ConfigError
from sftrainer.model import default_chat_template, is_vision_config, prepare_tokenizer, read_chat_template
from sftrainer.vision.processor import placeholder

logger = logging.getLogger(__name__)

# Used when neither the processor nor its tokenizer has a chat template: the default text template's
# headers, with image parts rendered as the processor's placeholder.
DEFAULT_VISION_TEMPLATE = (
    "{{ bos }}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '{{ placeholder }}' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{ text + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + text + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' + text + eos_token + '\\n\\n' }}"
    "{%- else -%}{{ '### ' + message['role'] | capitalize + ':\\n' + text + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)


def is_vision_model(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return is_vision_config(getattr(base, "config", None))


def prepare_processor(
    processor: Any,
    chat_template: str | None = None,
    *,
    chat_template_path: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
) -> Any:
    """The processor ready for fine-tuning: its tokenizer prepared by ``model.prepare_tokenizer`` with
    the processor's chat template (or ``chat_template`` / ``chat_template_path``; without any, a
    default that renders image parts as the processor's placeholder). A copy where anything changes."""
    tokenizer = processor.tokenizer
    own = processor.chat_template if isinstance(processor.chat_template, str) else None
    template = read_chat_template(chat_template) if chat_template else None
    if template is None and chat_template_path is None:
        template = own or tokenizer.chat_template or _default_template(processor, tokenizer)
    prepared = prepare_tokenizer(
        tokenizer,
        template,
        chat_template_path=chat_template_path if template is None else None,
        eos_token=eos_token,
        pad_token=pad_token,
    )
    if prepared is tokenizer and own == prepared.chat_template:
        return processor
    out = copy.copy(processor)  # the image processor is shared, never changed
    out.tokenizer = prepared
    out.chat_template = prepared.chat_template
    return out


def _default_template(processor: Any, tokenizer: Any) -> str:
    bos = "{{ bos_token }}" if default_chat_template(tokenizer).startswith("{{ bos_token }}") else ""
    logger.info(
        "Neither the processor nor its tokenizer has a chat template; using sftrainer's default ('### "
        "User:' / '### Assistant:' headers, images as %r)",
        placeholder(processor),
    )
    text = DEFAULT_VISION_TEMPLATE.replace("{{ bos }}", bos)
    return text.replace("{{ placeholder }}", placeholder(processor).replace("'", "\\'"))


# ---- what trains -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionParts:
    """Module paths (in the model's ``named_modules``) of a vision-language model's parts."""

    language: str | None
    vision_tower: tuple[str, ...]
    projector: tuple[str, ...]


def vision_parts(model: Any) -> VisionParts:
    names = {id(m): n for n, m in model.named_modules()}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    language = names.get(id(decoder)) if decoder is not None else None
    if not language:
        language = next((n for n in names.values() if n.rsplit(".", 1)[-1] in LANGUAGE_MODEL_NAMES), None)

    def outermost(candidates: tuple[str, ...]) -> tuple[str, ...]:
        found = [n for n in names.values() if n and n.rsplit(".", 1)[-1] in candidates]
        return tuple(n for n in found if not any(n.startswith(f"{m}.") for m in found if m != n))

    return VisionParts(language, outermost(VISION_TOWER_NAMES), outermost(PROJECTOR_NAMES))


def adapt_for_training(
    model: Any, peft_config: Any, train_projector: bool = False, train_vision_tower: bool = False
) -> Any:
    """Freeze what does not train (full fine-tuning, in place) or return the ``LoraConfig`` adapted to
    the language model (a copy; the caller's is left alone). Returns the peft config to apply."""
    if hasattr(model, "get_base_model"):  # a PeftModel: its adapter already says what trains
        return peft_config
    if peft_config is not None and not hasattr(peft_config, "target_modules"):  # prompt tuning etc.
        return peft_config
    parts = vision_parts(model)
    if parts.language is None:
        raise ConfigError(
            f"{type(model).__name__}: sftrainer cannot find its language model (a module named "
            f"{' or '.join(LANGUAGE_MODEL_NAMES)}, or get_decoder()), so it cannot tell what to train"
        )
    if not parts.vision_tower:
        logger.warning(
            "%s: no vision tower found by name (%s); nothing is frozen besides what PEFT freezes",
            type(model).__name__,
            ", ".join(VISION_TOWER_NAMES),
        )
    if peft_config is not None:
        return _lora_config(model, peft_config, parts, train_projector, train_vision_tower)

    def trains(name: str) -> bool:
        if _inside(name, parts.projector):
            return train_projector
        return train_vision_tower if _inside(name, parts.vision_tower) else True

    count = 0
    for name, param in model.named_parameters():
        if not trains(name):
            param.requires_grad_(False)
            count += param.numel()
    frozen = [
        p
        for p, on in ((parts.vision_tower, train_vision_tower), (parts.projector, train_projector))
        if not on
    ]
    logger.info(
        "Vision-language model: trains the language model%s; frozen: %s (%s parameters)",
        _also(train_projector, train_vision_tower),
        ", ".join(n for names in frozen for n in names) or "nothing",
        f"{count:,}",
    )
    return None


def _lora_config(
    model: Any, peft_config: Any, parts: VisionParts, train_projector: bool, train_vision_tower: bool
) -> Any:
    targets = peft_config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        logger.info(
            "LoRA target_modules is a regular expression; applied as given (vision tower included if it matches)"
        )
        return peft_config
    assert parts.language is not None  # adapt_for_training refuses a model without a language model
    prefixes = [parts.language] + (list(parts.vision_tower) if train_vision_tower else [])
    head = model.get_output_embeddings()
    if targets is None or targets == "all-linear":
        names = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) and module is not head and _inside(name, prefixes)
            }
        )
    else:
        names = sorted(targets)
    out = copy.deepcopy(peft_config)
    out.target_modules = (
        rf"(?:{'|'.join(map(re.escape, prefixes))})\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"
    )
    if train_projector:
        out.modules_to_save = [*(peft_config.modules_to_save or []), *parts.projector]
    logger.info(
        "Vision-language model: LoRA on %s of the language model%s; the %s stay frozen",
        ", ".join(names),
        " and the vision tower" if train_vision_tower else "",
        "projector is trained in full, the vision tower" if train_projector else "vision tower and projector",
    )
    return out


def _inside(name: str, prefixes: Any) -> bool:
    return any(name == p or name.startswith(f"{p}.") for p in prefixes)


def _also(projector: bool, tower: bool) -> str:
    extra = [what for what, on in (("the projector", projector), ("the vision tower", tower)) if on]
    return f" and {' and '.join(extra)}" if extra else ""


# ---- packing -------------------------------------------------------------------------------------


def packing_problem(model: Any) -> str | None:
    """Why this family cannot keep packed rows apart, or None (then ``check_isolation`` checks it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = config.model_type
    if isinstance(rope, dict) and rope.get("mrope_section"):
        return (
            f"{kind} computes its 3-D rotary positions (M-RoPE) from the batch's image grids, not from "
            "position_ids, so the rows of a packed or padding-free batch cannot restart their positions"
        )
    if getattr(config, "cross_attention_layers", None) or kind == "mllama":
        return f"{kind} attends to images through cross-attention masks laid out per batch row"
    return None
