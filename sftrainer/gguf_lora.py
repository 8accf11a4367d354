"""A LoRA adapter as a GGUF LoRA, which llama.cpp applies to a base GGUF at load time
(``llama-cli -m base-f16.gguf --lora adapter-f16.gguf``).

``lora_problems`` says, from ``adapter_config.json`` and the adapter's weight names alone, what such a
file cannot carry; ``write_lora_gguf(model, path, qtype)`` writes the adapter of a loaded ``PeftModel``.
``sftrainer export RUN OUT --format gguf-lora`` (``sftrainer.export.export``) checks first, then writes
the base (``sftrainer.gguf_export.write_gguf``, unmerged) and the adapter side by side.

The layout is what llama.cpp's loader and graph read (``src/llama-adapter.cpp``,
``llama_adapter_lora_init_impl``; ``src/llama-graph.cpp``, ``build_lora_mm``; llama.cpp as vendored by
llama-cpp-python 0.3.36):

- ``general.type`` "adapter", ``general.architecture`` the base's (another is refused at load),
  ``adapter.type`` "lora", ``adapter.lora.alpha`` (float32);
- per adapted matrix ``W`` (GGUF name ``N``, e.g. ``blk.0.attn_q.weight``): ``N.lora_a`` [r, in] and
  ``N.lora_b`` [out, r] (numpy order), i.e. PEFT's ``lora_A`` / ``lora_B`` weights as they are;
- llama.cpp computes ``W x + s * B (A x)`` with ``s = alpha / r``, ``r`` read per tensor from
  ``lora_a``. PEFT's scale is per module (alpha / r; alpha / sqrt(r) with rsLoRA; ``rank_pattern`` /
  ``alpha_pattern``): the file's alpha is ``scale * r`` of the first module (``alpha * sqrt(r)`` for
  rsLoRA), and a module whose own ``scale * r`` differs has its ``B`` multiplied by the ratio;
- the base conversion permutes the Q and K rows of the ``llama`` architecture (``W' = P W``,
  ``gguf_export.unpermute``), so ``B`` of ``q_proj`` / ``k_proj`` gets the same row permutation
  (``P W + s P B A``); ``A`` is unchanged.

Refused, every problem at once and before anything is written: DoRA (llama.cpp has no magnitude
vector), ``modules_to_save`` and trainable tokens (fully trained weights, not a low-rank pair), trained
biases, LoRA on the token embeddings (llama.cpp reads a flipped layout there that this module does not
write, and with tied embeddings would apply it to the output projection too), LoRA on a tied
``lm_head`` (the base GGUF has no ``output.weight``), and families whose conversion does more than the
Q/K permutation to a matrix. ``tests/test_gguf_lora.py`` checks the files with llama.cpp itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sftrainer.errors import ConfigError
from sftrainer.gguf_export import INSTALL_HINT, family, gguf_available, unpermute

logger = logging.getLogger(__name__)

LORA_TYPES = ("f16", "bf16")  # the adapter's (and its base's) weight types
# Families whose base conversion writes every adapted matrix as transformers holds it, or with the Q/K
# row permutation (gguf_export.FAMILIES); another family is refused until its layout is checked here.
LORA_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PAIR_SUFFIXES = (".lora_A.weight", ".lora_B.weight")  # the only weights of an adapter llama.cpp applies
MERGE_HINT = "use --format gguf, which merges the adapter into the base first"


def lora_problems(adapter: dict[str, Any], weight_names: Iterable[str], base_config: Any) -> list[str]:
    """Every reason the PEFT adapter whose ``adapter_config.json`` is ``adapter``, whose saved weights
    are named ``weight_names``, on a base of config ``base_config``, cannot be a GGUF LoRA (none: it
    can)."""
    out = []
    if base_config.model_type not in LORA_FAMILIES:
        out.append(
            f"model_type {base_config.model_type!r}: GGUF LoRA export supports {', '.join(LORA_FAMILIES)}"
        )
    peft_type = adapter.get("peft_type", "LORA")
    if peft_type != "LORA":
        return [*out, f"the adapter is {peft_type}, not LoRA: a GGUF adapter holds LoRA pairs only"]
    if adapter.get("use_dora"):
        out.append("DoRA (use_dora: true): llama.cpp applies W + s·BA, without DoRA's magnitude vector")
    if adapter.get("modules_to_save"):
        out.append(
            f"modules_to_save {adapter['modules_to_save']}: fully trained modules, not LoRA pairs, which a "
            "GGUF adapter cannot hold"
        )
    if adapter.get("trainable_token_indices"):
        out.append(
            f"trainable tokens (trainable_token_indices {adapter['trainable_token_indices']}): trained "
            "embedding rows, which a GGUF adapter cannot hold"
        )
    if adapter.get("bias", "none") != "none" or adapter.get("lora_bias"):
        out.append("trained biases (bias / lora_bias): a GGUF adapter holds LoRA pairs only, no biases")
    if adapter.get("target_parameters"):
        out.append(
            f"LoRA on parameters (target_parameters {adapter['target_parameters']}): not written by this export"
        )
    if adapter.get("alora_invocation_tokens"):
        out.append("activated LoRA (alora_invocation_tokens): not written by this export")
    names = list(weight_names)
    embeddings = sorted(
        {n.split(".lora_embedding_")[0].rsplit(".", 1)[-1] for n in names if ".lora_embedding_" in n}
    )
    if embeddings:
        out.append(
            f"LoRA on the token embeddings ({', '.join(embeddings)}): llama.cpp reads another layout for "
            "token_embd, which this export does not write (and with tied embeddings it would apply it to "
            "the output projection too)"
        )
    tied = bool(getattr(base_config, "tie_word_embeddings", False))
    if tied and any(".lm_head." in n for n in names):
        out.append(
            "LoRA on lm_head of a model with tied embeddings: the base GGUF has no output.weight to apply it to"
        )
    if not out:
        other = [n for n in names if not n.endswith(PAIR_SUFFIXES)]
        if other:
            out.append(
                f"weights other than LoRA pairs ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''})"
            )
    return out


def _import_gguf() -> Any:
    if not gguf_available():
        raise ConfigError(f"GGUF export needs the gguf package, which is not installed: {INSTALL_HINT}")
    import gguf

    return gguf


def write_lora_gguf(model: Any, path: str | Path, qtype: str = "f16", name: str | None = None) -> Path:
    """Write the LoRA adapter of ``model`` (a ``PeftModel`` with one active LoRA adapter on a base of a
    family in ``LORA_FAMILIES``, checked by ``lora_problems``) to the GGUF file ``path``, its pairs in
    ``qtype`` ('f16' or 'bf16'); it applies to the GGUF ``write_gguf`` makes of the base."""
    import numpy as np

    gguf = _import_gguf()
    if qtype not in LORA_TYPES:
        raise ConfigError(f"--format gguf-lora: --type must be one of {list(LORA_TYPES)}, got {qtype!r}")
    config = model.get_base_model().config
    fam = family(config.model_type)
    arch = getattr(gguf.MODEL_ARCH, fam.arch)
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    adapter_name = model.active_adapter
    pairs = []  # (gguf name, A [r, in], B [out, r], scale * r)
    for module_name, module in model.get_base_model().named_modules():
        if adapter_name not in getattr(module, "lora_A", {}):
            continue
        gguf_name = tensor_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise ConfigError(
                f"GGUF LoRA export: no llama.cpp tensor for {module_name!r} ({config.model_type})"
            )
        a = module.lora_A[adapter_name].weight.detach().float().cpu().numpy()  # [r, in]
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy()  # [out, r]
        if fam.unpermute_qk and module_name.endswith("q_proj"):
            b = unpermute(b, config.num_attention_heads)
        elif fam.unpermute_qk and module_name.endswith("k_proj"):
            b = unpermute(b, config.num_key_value_heads)
        pairs.append((gguf_name, a, b, float(module.scaling[adapter_name]) * a.shape[0]))
    if not pairs:
        raise ConfigError("GGUF LoRA export: the adapter has no LoRA layers")

    alpha = pairs[0][3]
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_name(name or path.stem)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for gguf_name, a, b, module_alpha in pairs:
        if module_alpha != alpha:  # rank_pattern / alpha_pattern: this module's scale, folded into B
            b = b * (module_alpha / alpha)
        for suffix, array in ((".lora_a", a), (".lora_b", b)):
            if qtype == "bf16":
                bf16 = gguf.GGMLQuantizationType.BF16
                writer.add_tensor(gguf_name + suffix, gguf.quants.quantize(array, bf16), raw_dtype=bf16)
            else:
                writer.add_tensor(gguf_name + suffix, array.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    logger.info("Wrote %d LoRA pairs (alpha %.4g) to %s", len(pairs), alpha, path)
    return path
