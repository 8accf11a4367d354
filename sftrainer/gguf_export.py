"""A model and its tokenizer as one GGUF file for llama.cpp (and what runs on it: LM Studio, Ollama).

``write_gguf(model, tokenizer, path, qtype)`` writes the weights (f16, bf16 or q8_0; norms and biases
float32, as llama.cpp keeps them), the hyperparameters llama.cpp reads for the family, and the tokenizer
with the chat template training used and its stop tokens (``sftrainer.gguf_vocab``). ``sftrainer export
RUN OUT --format gguf`` (``sftrainer.export.export``) gives it a run's model, an adapter merged into its
full-precision base first.

The conversion is this module's own, on the ``gguf`` package (its writer, architecture names and
tensor-name maps), pinned in the ``gguf`` extra; llama.cpp is never built or run here. What differs from
transformers' layout, per family (``FAMILIES``):

- Llama / Mistral (llama.cpp ``llama``): Q and K rows permuted from transformers' rotate-half RoPE
  layout back to the interleaved one llama.cpp's ``llama`` graph applies (``unpermute``); Llama 3.1's
  RoPE scaling as a ``rope_freqs`` tensor;
- Qwen2 (``qwen2``): Q/K/V biases; Qwen3 (``qwen3``): per-head Q/K RMS norms. Both use rotate-half RoPE
  (NeoX) in llama.cpp too: no permutation;
- Gemma 2 / Gemma 3 (``gemma2``, ``gemma3``): every RMSNorm weight written as ``1 + w`` (transformers'
  Gemma norms scale by ``1 + w``, llama.cpp's by the stored weight); the per-layer sliding-window
  pattern as a list (``layer_types``); the soft-caps; Gemma 3's local RoPE base
  (``rope_freq_base_swa``). llama.cpp fixes the attention scale by model size, not by
  ``query_pre_attn_scalar``: where they differ, the difference is folded into Q (``_gemma_q_scale``).
  A ``gemma3`` vision-language checkpoint is written as its text model (llama.cpp keeps the vision tower
  in a separate mmproj file);
- Phi-3 (``phi3``): the fused ``qkv_proj`` and ``gate_up_proj`` as they are (llama.cpp's ``phi3`` reads
  them fused, in the same order); LongRoPE as ``rope_factors_short`` / ``rope_factors_long`` tensors with
  its attention factor. llama.cpp runs Phi-3 without its sliding window (it says so when loading).

A tied ``lm_head`` is not written: llama.cpp uses the token embeddings for the output where the file
has no ``output.weight``. ``tests/test_gguf.py`` checks the files against llama.cpp itself.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftrainer.constants import GGUF_TYPES
from sftrainer.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sftrainer[gguf]'"
QUANT_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values; other rows stay f16


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    unpermute_qk: bool = False  # rotate-half (transformers) -> interleaved (llama.cpp `llama`) RoPE
    gemma: bool = False  # (1 + w) norms, soft-caps, sliding-window pattern, query_pre_attn_scalar
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")  # of full attention, those converted
    # llama.cpp's graph fixes the attention scale by layer count: 1/sqrt(hidden/heads) for the model of
    # this many layers (Gemma 2 27B, Gemma 3 27B), 1/sqrt(head_dim) otherwise
    big_model_layers: int | None = None


FAMILIES = {
    "llama": Family("LLAMA", unpermute_qk=True),
    "mistral": Family("LLAMA", unpermute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma2": Family("GEMMA2", gemma=True, rope_types=("default", "linear"), big_model_layers=46),
    "gemma3_text": Family("GEMMA3", gemma=True, rope_types=("default", "linear"), big_model_layers=62),
    "gemma3": Family("GEMMA3", gemma=True, rope_types=("default", "linear"), big_model_layers=62),
    "phi3": Family("PHI3", rope_types=("default", "longrope")),
}
# a vision-language checkpoint written as its text model: its prefix, and the parts left out
TEXT_PREFIX = ("model.language_model.", "model.")
VISION_PARTS = ("model.vision_tower.", "model.multi_modal_projector.")


def gguf_available() -> bool:
    """Whether the ``gguf`` extra is installed; found without importing it."""
    return importlib.util.find_spec("gguf") is not None


def _import_gguf() -> Any:
    if not gguf_available():
        raise ConfigError(f"GGUF export needs the gguf package, which is not installed: {INSTALL_HINT}")
    import gguf

    return gguf


def check_type(qtype: str) -> None:
    if qtype not in GGUF_TYPES:
        raise ConfigError(f"--type must be one of {list(GGUF_TYPES)}, got {qtype!r}")


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ConfigError(
            f"GGUF export does not support model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def write_gguf(
    model: Any, tokenizer: Any, path: str | Path, qtype: str = "f16", name: str | None = None
) -> Path:
    """Write ``model`` (a transformers causal LM of a family in ``FAMILIES``) and ``tokenizer`` (with its
    chat template) to the GGUF file ``path`` in ``qtype`` ('f16', 'bf16' or 'q8_0')."""
    from sftrainer.generate import stop_token_ids
    from sftrainer.gguf_vocab import vocab_metadata

    gguf = _import_gguf()
    check_type(qtype)
    fam = family(model.config.model_type)
    config = model.config.get_text_config()
    _check_convertible(config, fam)
    if fam.arch == "GEMMA2" and not _tied(model):
        raise ConfigError(
            "GGUF export cannot convert this gemma2 model for llama.cpp: its lm_head is not tied to the "
            "token embeddings (llama.cpp's gemma2 graph has no separate output matrix)"
        )
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    path = Path(path)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    eot = [t for t in stop_token_ids(tokenizer) if t != tokenizer.eos_token_id]
    vocab = vocab_metadata(tokenizer, n_vocab, eot_id=eot[0] if eot else None)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(_safe_name(name or path.stem, vocab.tokens))
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[qtype]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = _hparams(writer, gguf, model.config, n_vocab, fam)
    vocab.write(writer)

    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for tensor_name, array in _extra_tensors(gguf, config, head_dim):
        writer.add_tensor(tensor_name, array)
    for hf_name, array in _tensors(model, config, fam, tied=_tied(model)):
        gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no llama.cpp tensor for {hf_name!r} ({config.model_type})")
        data, raw_dtype = _encode(gguf, array, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# llama.cpp changes a vocabulary by the model's name: one named "phi3" / "phi-3" gets Phi-3's
# whitespace-stripping special tokens, and fails to load where these tokens are missing (src/llama-vocab.cpp)
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def _safe_name(name: str, tokens: list[str]) -> str:
    """``name``, unless llama.cpp would take it for Phi-3's vocabulary and this one lacks Phi-3's tokens
    (the file would not load): then with "phi_3" for "phi3"."""
    if PHI3_NAME.search(name) and not set(PHI3_TOKENS) <= set(tokens):
        safe = PHI3_NAME.sub("phi_3", name)
        logger.info(
            "GGUF name %r written as %r: llama.cpp reads 'phi3' in a name as Phi-3's vocabulary", name, safe
        )
        return safe
    return name


def _check_convertible(config: Any, fam: Family) -> None:
    """Refuse, by name, what llama.cpp's graph of the family would compute differently."""
    problems = []
    rope_type = _rope(config).get("rope_type", "default")
    if rope_type not in fam.rope_types:
        problems.append(
            f"RoPE scaling {rope_type!r} (converted for this family: {', '.join(fam.rope_types)})"
        )
    if fam.gemma:
        if getattr(config, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            problems.append(f"hidden_activation {config.hidden_activation!r} (llama.cpp: gelu_pytorch_tanh)")
        if getattr(config, "attention_bias", False):
            problems.append("attention_bias (llama.cpp's Gemma graphs have no attention biases)")
        if getattr(config, "use_bidirectional_attention", False):
            problems.append("use_bidirectional_attention (llama.cpp's Gemma graphs are causal)")
        local_rope = _rope(config, "sliding_attention").get("rope_type", "default")
        if fam.arch == "GEMMA3" and local_rope != "default":
            # llama.cpp's gemma3 scales the sliding layers' RoPE by nothing (its swa scale is 1)
            problems.append(f"RoPE scaling {local_rope!r} on the sliding-window layers")
        softcaps = (config.attn_logit_softcapping, config.final_logit_softcapping)
        if fam.arch == "GEMMA2" and None in softcaps:
            # llama.cpp's gemma2 graph always caps (50 and 30 where the file has no value)
            problems.append(f"soft-caps (attention, final) {softcaps}: llama.cpp's gemma2 applies both")
        if fam.arch == "GEMMA3" and config.attn_logit_softcapping is not None:
            problems.append("attn_logit_softcapping (llama.cpp's gemma3 graph has none)")
    if fam.arch == "PHI3" and getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (llama.cpp's phi3: silu)")
    if problems:
        raise ConfigError(
            f"GGUF export cannot convert this {config.model_type} model for llama.cpp: {'; '.join(problems)}"
        )


def _rope(config: Any, layer_type: str = "full_attention") -> dict[str, Any]:
    """The RoPE parameters of ``layer_type``'s layers (Gemma 3 keeps one set per layer type; other
    models one for all layers)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    nested = rope.get(layer_type)
    return dict(nested) if isinstance(nested, dict) else rope


def _theta(config: Any, rope: dict[str, Any]) -> float:
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _hparams(writer: Any, gguf: Any, model_config: Any, n_vocab: int, fam: Family) -> int:
    """The ``<arch>.*`` hyperparameters of ``model_config`` (its text model's); returns the head
    dimension."""
    config = model_config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = _rope(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
    writer.add_rope_freq_base(_theta(config, rope))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    if rope.get("rope_type", "default") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if fam.gemma:
        _gemma_hparams(writer, config, vision_language=config is not model_config)
    if fam.arch == "PHI3":
        _phi3_hparams(writer, config)
    return head_dim


def _gemma_hparams(writer: Any, config: Any, vision_language: bool) -> None:
    """Soft-caps; which layers use the sliding window, and its size; the sliding layers' RoPE base.
    transformers' Gemma 3 vision-language model never caps its logits (only ``Gemma3ForCausalLM``
    applies ``final_logit_softcapping``; released Gemma 3 models set none): the file does as it does."""
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if config.final_logit_softcapping is not None and not vision_language:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    sliding = [kind == "sliding_attention" for kind in config.layer_types]
    if any(sliding) and config.sliding_window:
        writer.add_sliding_window(int(config.sliding_window))
    writer.add_sliding_window_pattern(sliding)  # llama.cpp reads the per-layer list before its default
    local = _rope(config, "sliding_attention")
    local_theta = local.get("rope_theta") or getattr(config, "rope_local_base_freq", None) or 10000.0
    writer.add_rope_freq_base_swa(float(local_theta))


def _phi3_hparams(writer: Any, config: Any) -> None:
    """Phi-3's sliding window (which llama.cpp disables) and LongRoPE's original context and attention
    factor (the factors themselves are tensors: ``_extra_tensors``)."""
    window = getattr(config, "sliding_window", None)
    writer.add_sliding_window(int(window or 0))
    if window and window < config.max_position_embeddings:
        logger.warning(
            "Phi-3 attends within a sliding window of %d tokens; llama.cpp runs phi3 without it, so "
            "positions past %d tokens see more context in llama.cpp than in transformers",
            window,
            window,
        )
    rope = _rope(config)
    if rope.get("rope_type") == "longrope":
        original, attention_factor = _longrope(config, rope)
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(attention_factor)


def _longrope(config: Any, rope: dict[str, Any]) -> tuple[int, float]:
    """(original context, attention factor) of LongRoPE, as transformers computes them: the factor
    given, else sqrt(1 + ln(scale) / ln(original)) for scale = context / original context above 1."""
    original = int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings)
    if rope.get("attention_factor") is not None:
        return original, float(rope["attention_factor"])
    scale = rope.get("factor") or config.max_position_embeddings / original
    return original, math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


def _extra_tensors(gguf: Any, config: Any, head_dim: int) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp reads that transformers computes: RoPE frequency factors."""
    import numpy as np

    rope = _rope(config)
    kind = rope.get("rope_type")
    if kind == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return [(name, _llama3_rope_factors(config, head_dim))]
    if kind == "longrope":
        rotated = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        out = []
        for key, tensor in (("short_factor", "ROPE_FACTORS_SHORT"), ("long_factor", "ROPE_FACTORS_LONG")):
            factors = np.asarray(rope[key], dtype=np.float32)
            if factors.shape != (rotated // 2,):
                raise ConfigError(
                    f"GGUF export: LongRoPE {key} has {factors.size} values, not {rotated // 2}"
                )
            out.append((gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, tensor)] + ".weight", factors))
        return out
    return []


def _tied(model: Any) -> bool:
    """Whether the output matrix is the token embedding matrix (the same storage)."""
    output = model.get_output_embeddings()
    embeddings = model.get_input_embeddings().weight
    return output is None or output.weight.data_ptr() == embeddings.data_ptr()


def _tensors(model: Any, config: Any, fam: Family, tied: bool) -> Iterator[tuple[str, np.ndarray]]:
    """(transformers name of a text model, float32 array) of each tensor to write, in llama.cpp's
    layout: a tied ``lm_head`` left out; Q/K un-permuted (``llama``); Gemma's norms as ``1 + w`` and the
    attention scale folded into Q where llama.cpp's differs (``_gemma_q_scale``)."""
    q_scale = _gemma_q_scale(config, fam) if fam.gemma else 1.0
    dropped = set()
    for hf_name, tensor in model.state_dict().items():
        if hf_name.startswith(VISION_PARTS):
            dropped.add(hf_name.split(".")[1])
            continue
        hf_name = hf_name.replace(*TEXT_PREFIX) if hf_name.startswith(TEXT_PREFIX[0]) else hf_name
        if tied and hf_name == "lm_head.weight":
            continue
        array = tensor.detach().float().cpu().numpy()
        if fam.unpermute_qk and hf_name.endswith("q_proj.weight"):
            array = unpermute(array, config.num_attention_heads)
        elif fam.unpermute_qk and hf_name.endswith("k_proj.weight"):
            array = unpermute(array, config.num_key_value_heads)
        if fam.gemma and hf_name.endswith("norm.weight"):
            array = array + 1.0
        if q_scale != 1.0 and hf_name.endswith("q_norm.weight" if fam.arch == "GEMMA3" else "q_proj.weight"):
            array = array * q_scale  # Gemma 3: Q is normed after q_proj, so the scale goes on the norm
        yield hf_name, array
    if dropped:
        logger.info(
            "GGUF export writes the text model only: %s not written (llama.cpp reads a vision tower "
            "from a separate mmproj file)",
            ", ".join(sorted(dropped)),
        )


def _gemma_q_scale(config: Any, fam: Family) -> float:
    """What Q must be multiplied by so that llama.cpp's attention scale, fixed by model size, equals
    transformers' ``query_pre_attn_scalar ** -0.5`` (1.0 for the released Gemma 2 / 3 models)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    big = config.num_hidden_layers == fam.big_model_layers
    llama_cpp_scalar = config.hidden_size / config.num_attention_heads if big else head_dim
    scale = math.sqrt(llama_cpp_scalar / config.query_pre_attn_scalar)
    if scale != 1.0:
        logger.info(
            "query_pre_attn_scalar %s differs from the %s llama.cpp's %s graph divides by: Q scaled by %.6g",
            config.query_pre_attn_scalar,
            llama_cpp_scalar,
            fam.arch.lower(),
            scale,
        )
    return scale


def _llama3_rope_factors(config: Any, head_dim: int) -> np.ndarray:
    """Llama 3.1's RoPE frequency scaling as the per-frequency divisors llama.cpp's ``rope_freqs`` holds."""
    import numpy as np

    rope = _rope(config)
    theta = _theta(config, rope)
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def unpermute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Q or K rows [n_head * head_dim, in]: transformers keeps each head's RoPE pairs as (first half,
    second half); llama.cpp's ``llama`` graph rotates adjacent pairs. Per head, row j of half h moves to
    row 2j + h."""
    rows = weight.shape[0]
    per_head = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])  # [head, half, j, in]
    return per_head.swapaxes(1, 2).reshape(weight.shape)  # [head, j, half, in]


def _encode(gguf: Any, array: np.ndarray, qtype: str) -> tuple[np.ndarray, Any]:
    """(data, raw dtype or None) of one tensor: 1-D tensors (norms, biases) float32, as llama.cpp keeps
    them; matrices in ``qtype`` (q8_0 where rows split in blocks of 32, else f16)."""
    import numpy as np

    if array.ndim == 1:
        return array.astype(np.float32), None
    if qtype == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if qtype == "q8_0" and array.shape[-1] % QUANT_BLOCK == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None
