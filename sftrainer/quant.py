"""A quantized frozen base through bitsandbytes (the ``quant`` extra): settings -> ``BitsAndBytesConfig``,
in one place, for the YAML ``model:`` section and for the Python API (``quantization_config=``,
``model_init_kwargs``).

QLoRA is a 4-bit (or 8-bit) base plus LoRA adapters kept in float32. The base is frozen, and only
its linear layers are quantized; embeddings, norms and ``lm_head`` keep the dtype they were loaded
in. peft's ``prepare_model_for_kbit_training`` is not used: it casts every non-quantized weight to
float32 (for a 128k vocabulary at hidden 4096, about 2 GB more than bf16 embeddings and lm_head),
re-enables gradient checkpointing itself and freezes what is already frozen. What QLoRA does need is
done elsewhere: get_peft_model freezes the base, trainable tensors become float32 master weights
(``precision.keep_master_weights``) and checkpointed blocks get an input that requires grad
(``lora.apply``).

bitsandbytes is imported only when a model is loaded quantized, so nothing of it runs (or prints)
when the extra is absent or unused.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from sftrainer.constants import BNB_COMPUTE_DTYPES, BNB_QUANT_TYPES
from sftrainer.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sftrainer[quant]'"


def bitsandbytes_available() -> bool:
    """Whether the ``quant`` extra (bitsandbytes) is installed; found without importing it."""
    return importlib.util.find_spec("bitsandbytes") is not None


def missing_extra_message(what: str) -> str:
    return f"{what} needs bitsandbytes, which is not installed: {INSTALL_HINT}"


def default_compute_dtype() -> str:
    """bfloat16 where an accelerator supports it (what QLoRA was published with), else float32:
    the CPU and older GPUs (V100, T4) have no fast bf16 matmul, and fp16 compute overflows more easily."""
    from sftrainer.precision import accelerator_supports_bf16

    return "bfloat16" if accelerator_supports_bf16() else "float32"


def bnb_kwargs_names() -> list[str]:
    """The keyword arguments ``BitsAndBytesConfig`` takes (a mapping in config may use only these)."""
    from transformers import BitsAndBytesConfig

    params = inspect.signature(BitsAndBytesConfig.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def mapping_problems(mapping: Mapping[str, Any], key: str) -> list[str]:
    """Problems of a ``quantization_config`` mapping (``key``: its name as the user wrote it)."""
    names = bnb_kwargs_names()
    problems = [
        f"{key}.{name}: not a BitsAndBytesConfig setting{did_you_mean(name, names)}"
        for name in mapping
        if name not in names and name != "quant_method"
    ]
    method = mapping.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        problems.append(f"{key}.quant_method: only 'bitsandbytes' is supported, got {method!r}")
    four, eight = bool(mapping.get("load_in_4bit")), bool(mapping.get("load_in_8bit"))
    if four and eight:
        problems.append(f"{key}: set load_in_4bit or load_in_8bit, not both")
    elif not four and not eight:
        problems.append(
            f"{key}: set load_in_4bit: true or load_in_8bit: true (it quantizes nothing otherwise)"
        )
    if (four or eight) and not bitsandbytes_available():
        problems.append(f"{key}: " + missing_extra_message("a 4-bit or 8-bit model"))
    quant_type = mapping.get("bnb_4bit_quant_type")
    if quant_type is not None and quant_type not in BNB_QUANT_TYPES:
        problems.append(f"{key}.bnb_4bit_quant_type: must be one of {BNB_QUANT_TYPES}, got {quant_type!r}")
    return problems


def to_bnb_config(value: Any, key: str = "quantization_config") -> Any:
    """A ``BitsAndBytesConfig`` from a mapping of its arguments, or the config itself; checks that
    bitsandbytes is installed. Raises ``ConfigError`` naming ``key``. Other transformers quantization
    configs (GPTQ, AWQ, torchao, ...) are returned as they are: transformers checks their packages."""
    from transformers import BitsAndBytesConfig

    if isinstance(value, Mapping):
        problems = mapping_problems(value, key)
        if problems:
            raise ConfigError("\n".join(problems))
        kwargs = {k: v for k, v in value.items() if k != "quant_method"}
        if kwargs.get("load_in_4bit"):
            kwargs.setdefault("bnb_4bit_compute_dtype", default_compute_dtype())
        try:
            return BitsAndBytesConfig(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}: {err}") from None
    if isinstance(value, BitsAndBytesConfig) and value.is_quantizable() and not bitsandbytes_available():
        raise ConfigError(missing_extra_message(key))
    return value


def model_bnb_config(
    *,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str | None = None,
    bnb_4bit_use_double_quant: bool | None = None,
    bnb_4bit_compute_dtype: str | None = None,
    quantization_config: Mapping[str, Any] | None = None,
) -> Any:
    """The ``BitsAndBytesConfig`` of the YAML ``model:`` keys, or None when the model is not quantized.

    4-bit defaults are QLoRA's: NF4, double quantization (about 0.4 bit per weight less), and the
    compute dtype of ``default_compute_dtype``.
    """
    if quantization_config is not None:
        return to_bnb_config(quantization_config, "model.quantization_config")
    if load_in_4bit:
        compute = bnb_4bit_compute_dtype
        return to_bnb_config(
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": bnb_4bit_quant_type or "nf4",
                "bnb_4bit_use_double_quant": True
                if bnb_4bit_use_double_quant is None
                else bnb_4bit_use_double_quant,
                "bnb_4bit_compute_dtype": default_compute_dtype() if compute in (None, "auto") else compute,
            },
            "model.load_in_4bit",
        )
    if load_in_8bit:
        return to_bnb_config({"load_in_8bit": True}, "model.load_in_8bit")
    return None


def settings_problems(
    load_in_4bit: bool,
    load_in_8bit: bool,
    bnb_4bit_quant_type: str | None,
    bnb_4bit_use_double_quant: bool | None,
    bnb_4bit_compute_dtype: str | None,
    quantization_config: Mapping[str, Any] | None,
) -> list[str]:
    """Problems of the quantization keys of the ``model:`` section, named as the user writes them."""
    out = []
    if load_in_4bit and load_in_8bit:
        out.append("model.load_in_4bit: set model.load_in_4bit or model.load_in_8bit, not both")
    if quantization_config is not None and (load_in_4bit or load_in_8bit):
        which = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        out.append(f"model.quantization_config: set model.quantization_config or model.{which}, not both")
    four_bit_keys = {
        "bnb_4bit_quant_type": bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": bnb_4bit_compute_dtype,
    }
    for name, value in four_bit_keys.items():
        if value is not None and not load_in_4bit:
            out.append(
                f"model.{name}: applies to a 4-bit base only; set model.load_in_4bit: true "
                "(or give it inside model.quantization_config)"
            )
    if bnb_4bit_quant_type is not None and bnb_4bit_quant_type not in BNB_QUANT_TYPES:
        out.append(
            f"model.bnb_4bit_quant_type: must be one of {BNB_QUANT_TYPES}, got {bnb_4bit_quant_type!r}"
            f"{did_you_mean(str(bnb_4bit_quant_type), BNB_QUANT_TYPES)}"
        )
    if bnb_4bit_compute_dtype is not None and bnb_4bit_compute_dtype not in BNB_COMPUTE_DTYPES:
        out.append(
            f"model.bnb_4bit_compute_dtype: must be one of {BNB_COMPUTE_DTYPES}, got {bnb_4bit_compute_dtype!r}"
            f"{did_you_mean(str(bnb_4bit_compute_dtype), BNB_COMPUTE_DTYPES)}"
        )
    if quantization_config is not None:
        out += mapping_problems(quantization_config, "model.quantization_config")
    elif (load_in_4bit or load_in_8bit) and not bitsandbytes_available():
        which = "load_in_4bit" if load_in_4bit else "load_in_8bit"
        out.append(f"model.{which}: " + missing_extra_message("a 4-bit or 8-bit model"))
    return out


def check_trainable(model: Any) -> None:
    """Refuse full fine-tuning of a quantized model: its k-bit weights cannot be updated."""
    from peft import PeftModel

    from sftrainer.precision import is_quantized

    if is_quantized(model) and not isinstance(model, PeftModel):
        raise ConfigError(
            "the model is loaded in 4-bit or 8-bit: its quantized weights cannot be trained, so full "
            "fine-tuning is impossible. Train a LoRA adapter on it (QLoRA): a lora: section in the YAML, "
            "or peft_config=LoraConfig(...) in Python; or load the model unquantized"
        )


def keep_training_layout(model: Any) -> None:
    """Keep every 4-bit layer in the layout bitsandbytes can train through.

    On a CPU with AVX512-BF16, bitsandbytes (0.50.2, where it was found; ``Linear4bit.forward``) repacks a 4-bit
    weight into an inference layout at its first forward in eval mode without gradients (the start
    of training checks the loss that way; evaluation runs that way), and from then on runs the
    layer through a kernel that has no backward: the gradient through the base layer to everything
    below it is lost, and the adapters train on wrong gradients, silently. The layers here are kept
    from repacking, and a weight already repacked (the caller evaluated the model first) is put back
    in the standard layout, as bitsandbytes itself does before saving. Inference on this CPU after
    training is then slower, not different."""
    layers = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        weight = layer.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                weight.data, weight.quant_state
            )
    if layers:
        logger.info(
            "bitsandbytes: %d 4-bit layers kept in their training layout on this CPU (AVX512-BF16): "
            "repacked for inference at an eval-mode forward, they could not be trained through",
            len(layers),
        )


def say_once_per_message(logger_name: str) -> None:
    """Let each message of ``logger_name`` through once: bitsandbytes 0.50 logs "MatMul8bitLt: inputs
    will be cast from torch.float32 to float16" at WARNING on every 8-bit matmul
    (autograd/_functions.py), hundreds of lines per step. Idempotent."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, _OncePerMessage) for f in target.filters):
        target.addFilter(_OncePerMessage())


class _OncePerMessage(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def describe(config: Any) -> str:
    """One line for the log: what the base is quantized to."""
    if getattr(config, "load_in_4bit", False):
        compute = str(config.bnb_4bit_compute_dtype).removeprefix("torch.")
        double = ", double quantization" if config.bnb_4bit_use_double_quant else ""
        return f"4-bit {config.bnb_4bit_quant_type}{double}, computing in {compute}"
    if getattr(config, "load_in_8bit", False):
        return "8-bit (LLM.int8)"
    return type(config).__name__
