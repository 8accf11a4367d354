"""Tiny random-init causal LMs of several architectures, built locally for tests (no network).

Each shares the built-in tokenizer (vocabulary and special tokens), so one tokenizer serves all of
them. ``save_tiny_model`` writes a directory loadable with ``from_pretrained`` / ``SFTTrainer(model=dir)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
)

HIDDEN = 64
COMMON = dict(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], dict[str, Any]]] = {
    "llama": (LlamaConfig, {}),
    "mistral": (MistralConfig, {"sliding_window": 128}),
    "gemma": (GemmaConfig, {"head_dim": HIDDEN // 4}),
    "phi3": (Phi3Config, {"num_key_value_heads": 4}),
    "qwen2": (Qwen2Config, {}),
}


# Families whose layers carry state along the sequence (causal convolutions, Mamba / gated DeltaNet
# recurrences), by transformers config class name: one stateful layer, one attention layer where the
# family has attention. Sizes are the smallest each accepts.
_MAMBA2 = dict(n_groups=1, chunk_size=16)
STATEFUL_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "lfm2": ("Lfm2Config", {"layer_types": ["conv", "full_attention"]}),
    "mamba": ("MambaConfig", {"state_size": 8}),
    "mamba2": ("Mamba2Config", {"num_heads": 8, "head_dim": 16, "state_size": 8, "expand": 2, **_MAMBA2}),
    "falcon_h1": (
        "FalconH1Config",
        {"mamba_d_ssm": 128, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8}
        | {"mamba_n_groups": 1, "mamba_chunk_size": 16},
    ),
    "nemotron_h": (
        "NemotronHConfig",
        {"layers_block_type": ["mamba", "attention"], "mamba_num_heads": 8, "mamba_head_dim": 16}
        | {"ssm_state_size": 8, "head_dim": 16, **_MAMBA2},
    ),
    "granitemoehybrid": (  # Granite 4
        "GraniteMoeHybridConfig",
        {"layer_types": ["linear_attention", "full_attention"], "mamba_n_heads": 8, "mamba_d_head": 16}
        | {"mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 16}
        | {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen3_next": (
        "Qwen3NextConfig",
        {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16, "linear_num_key_heads": 2}
        | {"linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16}
        | {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
        | {"shared_expert_intermediate_size": 32},
    ),
    "qwen3_5": (  # Qwen3.5's language model (Qwen3_5ForCausalLM)
        "Qwen3_5TextConfig",
        {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16, "linear_num_key_heads": 2}
        | {"linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16},
    ),
}


# More families with such layers, recognised from the model as well (not by name).
MORE_STATEFUL_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "lfm2_moe": (
        "Lfm2MoeConfig",
        {"layer_types": ["conv", "full_attention"], "num_experts": 4, "num_experts_per_tok": 2}
        | {"moe_intermediate_size": 32, "num_dense_layers": 1},
    ),
    "jamba": (
        "JambaConfig",
        {"num_experts": 2, "num_experts_per_tok": 1, "attn_layer_period": 2, "attn_layer_offset": 1}
        | {
            "expert_layer_period": 2,
            "expert_layer_offset": 1,
            "mamba_d_state": 8,
            "use_mamba_kernels": False,
        },
    ),
    "bamba": (
        "BambaConfig",
        {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8}
        | {"mamba_n_groups": 1, "mamba_chunk_size": 16},
    ),
    "falcon_mamba": ("FalconMambaConfig", {"state_size": 8}),
    "recurrent_gemma": (
        "RecurrentGemmaConfig",
        {"num_hidden_layers": 3, "num_key_value_heads": 1, "lru_width": 64, "attention_window_size": 16},
    ),
    "kimi_linear": (
        "KimiLinearConfig",
        {"num_experts": 4, "num_experts_per_token": 2, "moe_intermediate_size": 32, "kv_lora_rank": 16}
        | {"qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "linear_head_dim": 16}
        | {"linear_num_heads": 4},
    ),
    "minimax": (
        "MiniMaxConfig",
        {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16}
        | {"num_local_experts": 2, "num_experts_per_tok": 1},
    ),
    "olmo_hybrid": ("OlmoHybridConfig", {}),
}
# Recurrent families without a recurrent layer_type or a convolution: only the probe finds their leak.
UNRECOGNISED_STATEFUL_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "rwkv": ("RwkvConfig", {"attention_hidden_size": 64}),
    "xlstm": ("xLSTMConfig", {"num_heads": 4}),
}


def tiny_causal_lm(arch: str, vocab_size: int = 256, attn_implementation: str | None = None) -> Any:
    """A random-init (seed 0) float32 model of ``arch`` (a key of ARCHITECTURES or of the *STATEFUL_* tables).
    A family this transformers cannot build on the CPU is skipped, with the reason."""
    import pytest
    import transformers

    if arch in ARCHITECTURES:
        config_cls, extra = ARCHITECTURES[arch]
    else:
        stateful = STATEFUL_ARCHITECTURES | MORE_STATEFUL_ARCHITECTURES | UNRECOGNISED_STATEFUL_ARCHITECTURES
        name, extra = stateful[arch]
        config_cls = getattr(transformers, name, None)
        if config_cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no {name}")
    config = config_cls(
        **{**COMMON, **extra}, vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    except (ImportError, ValueError) as error:  # e.g. a family without SDPA support
        pytest.skip(
            f"{arch} cannot be built on the CPU with transformers {transformers.__version__}: {error}"
        )
    return model.float()


def tiny_config(arch: str, tokenizer: Any) -> PretrainedConfig:
    config_cls, extra = ARCHITECTURES[arch]
    return config_cls(
        **{**COMMON, **extra},
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny_model(
    arch: str, tokenizer: Any, path: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Build a random-init ``arch`` model, save it (in ``dtype``) and the tokenizer to ``path``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer), dtype=torch.float32).to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---- shared test helpers ----------------------------------------------------------------------

# The seed's examples plus two more, so a batch of 2 has rows of different lengths.
ROWS = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Who wrote Hamlet?", "response": "William Shakespeare."},
    {"prompt": "Reverse the words: cat dog", "response": "dog cat"},
    {"prompt": "Count the words: sun sun sun", "response": "3"},
]


def quick_args(output_dir: str | Path, **overrides: Any) -> Any:
    """An ``SFTConfig`` for a few-second CPU run: few steps, short rows, no checkpoints, no tqdm."""
    from sftrainer import SFTConfig

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_length=64,
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return SFTConfig(**values)


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters in ``before`` whose values differ now."""
    now = dict(model.named_parameters())
    return [n for n, old in before.items() if not torch.equal(now[n].detach(), old)]


def trained_text(tokenizer: Any, row: dict[str, list[int]]) -> str:
    """The tokens of a prepared row that carry loss, decoded with special tokens kept."""
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
