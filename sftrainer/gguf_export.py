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
  (NeoX) in llama.cpp too: no permutation.

A tied ``lm_head`` is not written: llama.cpp uses the token embeddings for the output where the file
has no ``output.weight``. ``tests/test_gguf.py`` checks the files against llama.cpp itself.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftrainer.constants import GGUF_TYPES
from sftrainer.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sftrainer[gguf]'"
QUANT_BLOCK = 32  # q8_0 quantizes rows in blocks of 32 values; other rows stay f16


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    unpermute_qk: bool = False  # rotate-half (transformers) -> interleaved (llama.cpp `llama`) RoPE


FAMILIES = {
    "llama": Family("LLAMA", unpermute_qk=True),
    "mistral": Family("LLAMA", unpermute_qk=True),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
}


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
    config = model.config
    fam = family(config.model_type)
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    path = Path(path)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    eot = [t for t in stop_token_ids(tokenizer) if t != tokenizer.eos_token_id]
    vocab = vocab_metadata(tokenizer, n_vocab, eot_id=eot[0] if eot else None)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or path.stem)
    file_type = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}[qtype]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    head_dim = _hparams(writer, gguf, config, n_vocab)
    vocab.write(writer)

    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    rope_freqs = _llama3_rope_factors(config, head_dim)
    if rope_freqs is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", rope_freqs)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"GGUF export: no llama.cpp tensor for {hf_name!r} ({config.model_type})")
        array = tensor.detach().float().cpu().numpy()
        if fam.unpermute_qk and hf_name.endswith("q_proj.weight"):
            array = unpermute(array, config.num_attention_heads)
        elif fam.unpermute_qk and hf_name.endswith("k_proj.weight"):
            array = unpermute(array, config.num_key_value_heads)
        data, raw_dtype = _encode(gguf, array, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _hparams(writer: Any, gguf: Any, config: Any, n_vocab: int) -> int:
    """The ``<arch>.*`` hyperparameters; returns the head dimension."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(n_vocab)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise ConfigError(f"GGUF export: RoPE scaling {kind!r} is not supported (default, linear, llama3)")
    return head_dim


def _llama3_rope_factors(config: Any, head_dim: int) -> np.ndarray | None:
    """Llama 3.1's RoPE frequency scaling as the per-frequency divisors llama.cpp's ``rope_freqs`` holds."""
    import numpy as np

    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
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
