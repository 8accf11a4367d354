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
