"""Random-init tiny models that stand in for the ``trl-internal-testing/tiny-*`` checkpoints.

Sizes follow the hub's tiny models (hidden size 8, 2 layers, 4 heads, MLP 32; MoE: 4 experts, 2 per
token), weights in bfloat16 as the hub stores them, Linear weights Xavier-uniform, embeddings
N(0, 0.02), norms 1. Qwen stand-ins keep the released vocabulary size (152064 / 151936), so token
ids match the hub's; the others are as large as their stand-in tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers as tf

SMALL = dict(
    hidden_size=8, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=32
)
MOE = dict(num_experts_per_tok=2)


@dataclass(frozen=True)
class Repo:
    """A model repository: its tokenizer family and a config factory (``None``: a tokenizer only)."""

    repo_id: str
    family: str
    config: Callable[[int], Any] | None = None  # vocabulary size -> config
    vocab_size: int | None = None  # the released size where ids matter; else the tokenizer's
    remote_code: bool = False
    weights: bool = True  # False: the config and tokenizer only (a template source)


def _qwen2(vocab: int) -> Any:
    return tf.Qwen2Config(**SMALL, vocab_size=vocab, tie_word_embeddings=False, max_window_layers=70)


REPOS = [
    Repo("trl-internal-testing/tiny-Qwen2ForCausalLM-2.5", "qwen2.5", _qwen2, vocab_size=152064),
    Repo(
        "trl-internal-testing/tiny-Qwen2ForCausalLM-R1-Distill", "r1-distill-qwen", _qwen2, vocab_size=152064
    ),
    Repo(
        "trl-internal-testing/tiny-Qwen3ForCausalLM",
        "qwen3",
        lambda v: tf.Qwen3Config(**SMALL, vocab_size=v, tie_word_embeddings=False),
        vocab_size=151936,
    ),
    Repo(
        "trl-internal-testing/tiny-Qwen3MoeForCausalLM",
        "qwen3",
        lambda v: tf.Qwen3MoeConfig(**SMALL, **MOE, vocab_size=v, num_experts=4, moe_intermediate_size=32),
        vocab_size=151936,
    ),
    # A chat-template source (chat_template_path): the tokenizer and the config, no weights needed.
    Repo(
        "Qwen/Qwen3-4B",
        "qwen3",
        lambda v: tf.Qwen3Config(**SMALL, vocab_size=v),
        vocab_size=151936,
        weights=False,
    ),
    Repo(
        "trl-internal-testing/tiny-Cohere2ForCausalLM",
        "command-r",
        lambda v: tf.Cohere2Config(**SMALL, vocab_size=v),
    ),
    Repo(
        "trl-internal-testing/tiny-FalconMambaForCausalLM",
        "falcon",
        lambda v: tf.FalconMambaConfig(hidden_size=8, num_hidden_layers=2, state_size=16, vocab_size=v),
    ),
    Repo(
        "trl-internal-testing/tiny-Glm4MoeForCausalLM",
        "glm4.5",
        lambda v: tf.Glm4MoeConfig(
            **SMALL, **MOE, vocab_size=v, n_routed_experts=4, moe_intermediate_size=32
        ),
    ),
    Repo(
        "trl-internal-testing/tiny-GptOssForCausalLM",
        "gpt-oss",
        lambda v: tf.GptOssConfig(**SMALL, **MOE, vocab_size=v, num_local_experts=4),
    ),
    Repo(
        "trl-internal-testing/tiny-NemotronHForCausalLM-nano",
        "nemotron",
        lambda v: tf.NemotronHConfig(
            vocab_size=v,
            hidden_size=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=32,
            layers_block_type=["mamba", "attention", "moe"],
            mamba_num_heads=8,
            mamba_head_dim=4,
            n_groups=1,
            ssm_state_size=16,
            conv_kernel=4,
            expand=2,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32,
            use_mamba_kernels=False,
        ),
    ),
    Repo(
        "trl-internal-testing/tiny-Olmo3ForCausalLM", "olmo3", lambda v: tf.Olmo3Config(**SMALL, vocab_size=v)
    ),
    Repo("trl-internal-testing/tiny-Lfm2ForCausalLM", "lfm2", lambda v: tf.Lfm2Config(**SMALL, vocab_size=v)),
    Repo(
        "trl-internal-testing/tiny-Lfm2ForCausalLM-2.5",
        "lfm2",
        lambda v: tf.Lfm2Config(**SMALL, vocab_size=v),
    ),
    Repo(
        "trl-internal-testing/tiny-DeepseekV3ForCausalLM",
        "deepseek-v3",
        lambda v: tf.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": 4},
            **MOE,
            vocab_size=v,
            n_routed_experts=4,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
        ),
    ),
    Repo(
        "trl-internal-testing/tiny-GPTNeoXForCausalLM",
        "gpt-neox",
        lambda v: tf.GPTNeoXConfig(
            hidden_size=8, num_attention_heads=4, num_hidden_layers=2, intermediate_size=32, vocab_size=v
        ),
    ),
    Repo(
        "trl-internal-testing/tiny-MistralForCausalLM-0.2",
        "mistral",
        lambda v: tf.MistralConfig(**SMALL, vocab_size=v),
    ),
    Repo(
        "trl-internal-testing/tiny-RemoteForCausalLM",
        "qwen2.5",
        lambda v: tf.LlamaConfig(**SMALL, vocab_size=v),
        vocab_size=152064,
        remote_code=True,
    ),
]

# A model whose code lives in its repository (``trust_remote_code``): a Llama under another name.
REMOTE_CONFIG = """from transformers import LlamaConfig


class RemoteConfig(LlamaConfig):
    model_type = "remote"
"""
REMOTE_MODEL = """from transformers import LlamaForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(LlamaForCausalLM):
    config_class = RemoteConfig
"""


def _init_weights(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.ones_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)


def save(repo: Repo, tokenizer: Any, out: Path, seed: int = 0) -> None:
    """Write ``repo`` (model, tokenizer, generation config) to ``out`` as ``save_pretrained`` does."""
    tokenizer.save_pretrained(out)
    if repo.config is None:
        return
    vocab = repo.vocab_size or len(tokenizer)
    config = repo.config(vocab)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for key, value in ids.items():
        setattr(config, key, value)
    if not repo.weights:
        config.save_pretrained(out)
        tf.GenerationConfig(**ids).save_pretrained(out)
        return
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _init_weights(model)
    model = model.to(torch.bfloat16)
    model.generation_config = tf.GenerationConfig(**ids)
    model.save_pretrained(out)
    if repo.remote_code:
        _as_remote_code(out)


def _as_remote_code(out: Path) -> None:
    (out / "configuration_remote.py").write_text(REMOTE_CONFIG, encoding="utf-8")
    (out / "modeling_remote.py").write_text(REMOTE_MODEL, encoding="utf-8")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
