"""Vision-language models: their processor, what trains, and whether packed rows stay apart.

- ``prepare_processor``: the checkpoint's processor (image processor + tokenizer + chat template;
  ``model.load_processor`` loads it) made ready as ``model.prepare_tokenizer`` makes a tokenizer
  ready, as a copy wherever something changes.
- ``adapt_for_training``: the language model trains, the vision tower and the projector stay frozen
  unless ``train_vision_tower`` / ``train_projector`` say otherwise. Full fine-tuning freezes them in
  place; LoRA gets a copy of the ``LoraConfig`` whose ``target_modules`` match the language model's
  layers only (PEFT's ``all-linear`` would also adapt every linear layer of the vision tower), with
  the projector in ``modules_to_save`` when it trains.
- ``packing_problem`` / ``check_isolation``: packing and padding-free batches for families whose
  rows can be kept apart by ``position_ids``, checked on the model with images before training;
  families that compute their positions from the batch's image layout are refused.
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
from sftrainer.data.collate import PositionCollator
from sftrainer.errors import ConfigError, ContaminationError
from sftrainer.isolation import check_row_isolation, stateful_layers
from sftrainer.model import is_vision_config, prepare_tokenizer, read_chat_template

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


def is_processor(obj: Any) -> bool:
    """A multimodal processor with an image processor and a tokenizer (not a bare tokenizer)."""
    from transformers import ProcessorMixin

    return isinstance(obj, ProcessorMixin) and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer of a processor, or the tokenizer itself."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def preview_decoder(processing_class: Any) -> Any:
    """What decodes rows for people: a processor's runs of image tokens written once (``<image>×576``)."""
    if not is_processor(processing_class):
        return processing_class
    from sftrainer.data.vision import CollapsedImages

    return CollapsedImages(processing_class)


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
    from sftrainer.data.vision import placeholder
    from sftrainer.model import default_chat_template

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


@torch.no_grad()
def check_isolation(model: Any, collator: Any, compute_dtype: torch.dtype | None = None) -> None:
    """Raise ``ContaminationError`` unless rows packed with their images are isolated.

    As ``isolation.check_row_isolation``, with an image in each row: two rows of text around an image
    each (different images) are laid out as the collator lays out training batches, and the logits of
    the second are compared with those of the same row alone, in a batch of its own.
    """
    from sftrainer.data.images import image_ref
    from sftrainer.data.vision import VisionTokenizer
    from sftrainer.data.vision_collate import VisionCollator

    problem = packing_problem(model)
    if problem is not None:
        raise ContaminationError(
            f"packing / padding_free: {problem}; set packing=False and padding_free=False"
        )
    if stateful_layers(model):  # rows of text show a state carried from one row into the next
        text = PositionCollator(collator.pad_token_id, flatten=collator.flatten)
        check_row_isolation(model, text, compute_dtype)
    processor = collator.processor
    encoder = VisionTokenizer(processor)
    images = [_probe_image(k) for k in range(2)]
    rows = []
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    for k, image in enumerate(images):
        (expansion,) = encoder.expansions([[image]])[0]
        ids = encoder.tokenizer(expansion, add_special_tokens=False)["input_ids"]
        before, after = (
            [i for i in torch.randint(3, vocab, (n,), generator=gen).tolist() if i not in encoder.special_ids]
            for n in (6 + k, 4)
        )
        rows.append({"input_ids": before + ids + after, "images": [image_ref(image, "probe")]})
    first, second = rows
    if collator.flatten:
        features = rows
    else:  # one packed row, plus a plain row so the batch dimension is exercised too
        positions = [*range(len(first["input_ids"])), *range(len(second["input_ids"]))]
        packed = {"input_ids": first["input_ids"] + second["input_ids"], "position_ids": positions}
        features = [{**packed, "images": first["images"] + second["images"]}, first]
    alone = VisionCollator(processor, collator.pad_token_id)([second])
    together = collator(features)
    span = (len(first["input_ids"]), len(first["input_ids"]) + len(second["input_ids"]))
    error, scale = _difference(model, together, alone, span)
    compute_dtype = compute_dtype or model.dtype
    tolerance = 1e-3 if compute_dtype == torch.float32 else 3e-2
    impl = getattr(model.config, "_attn_implementation", None) or "unknown"
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if not error <= tolerance * scale:
        typed = [k for k in ("token_type_ids", "mm_token_type_ids") if k in together]
        if typed:  # is it the bidirectional attention within images that crosses the rows?
            plain = [{k: v for k, v in b.items() if k not in typed} for b in (together, alone)]
            without, scale = _difference(model, *plain, span)
            if without <= tolerance * scale:
                import transformers

                raise ContaminationError(
                    f"packing / padding_free with images: {name} attends bidirectionally within each image "
                    f"({typed[0]}), and transformers {transformers.__version__}'s attention masks do not keep "
                    f"that inside each packed row (logits differ by {error:.3g} from the row alone; without "
                    f"{typed[0]} by {without:.2g}). Set packing=False and padding_free=False for this model."
                )
        raise ContaminationError(
            f"packed rows with images attend to each other with {name} and attn_implementation='{impl}' "
            f"(logits differ by {error:.3g} from the row alone), so packing or padding-free batches would "
            "train on cross-row context. Set packing=False and padding_free=False, or try "
            "attn_implementation 'sdpa' or 'eager'."
        )
    logger.info(
        "Packed rows with images are isolated (%s, attn_implementation='%s', max logit difference %.2g)",
        name,
        impl,
        error,
    )


def _difference(model: Any, together: dict, alone: dict, span: tuple[int, int]) -> tuple[float, float]:
    """(max |logit difference| of the row at ``span`` of ``together``'s first row vs ``alone``, scale)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        got = model(**_on(together, device), use_cache=False).logits[0, span[0] : span[1]].float()
        want = model(**_on(alone, device), use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    return (got - want).abs().max().item(), max(1.0, want.abs().max().item())


def _probe_image(k: int) -> Any:
    from PIL import Image

    gen = torch.Generator().manual_seed(k)
    pixels = torch.randint(0, 256, (48, 40, 3), generator=gen, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def _on(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
