"""Optimizers by name (``optim``): each trains a few steps on a tiny model and changes exactly the
trainable parameters; weight decay skips norms and biases; a missing optional package is a
``ConfigError`` naming the extra, raised when the config is built (before any model loads)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from tiny_models import COMMON, ROWS, quick_args, tiny_config
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen3Config
from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

from sftrainer import ConfigError, SFTConfig, SFTTrainer
from sftrainer.constants import BITSANDBYTES_OPTIMIZERS
from sftrainer.memory import is_installed, optimizer_problems
from sftrainer.run_config import load_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

NO_TORCHAO = "torchao is not installed (pip install 'sftrainer[torchao]')"
OPTIMIZERS = [
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
    "adafactor",
    pytest.param(
        "adamw_torch_4bit", marks=pytest.mark.skipif(not is_installed("torchao"), reason=NO_TORCHAO)
    ),
    pytest.param(
        "adamw_torch_8bit", marks=pytest.mark.skipif(not is_installed("torchao"), reason=NO_TORCHAO)
    ),
]


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[bool, torch.Tensor]]:
    return {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_optimizer_changes_exactly_the_trainable_parameters(tiny_model, tokenizer, tmp_path, optim, method):
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    trainer = SFTTrainer(
        model=tiny_model,
        args=quick_args(tmp_path, optim=optim, max_steps=2, weight_decay=0.01, learning_rate=1e-2),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=peft_config if method == "lora" else None,
    )
    before = _snapshot(trainer.model)
    trainer.train()
    assert trainer.state.global_step == 2
    now = dict(trainer.model.named_parameters())
    moved = {n for n, (_, old) in before.items() if not torch.equal(now[n].detach(), old)}
    trainable = {n for n, (requires_grad, _) in before.items() if requires_grad}
    assert trainable, "nothing to train"
    assert trainable - moved == set(), f"{optim}: trainable parameters that did not change"
    assert moved - trainable == set(), f"{optim}: frozen parameters that changed"
    if method == "lora":
        assert all("lora_" in n for n in trainable)


def test_8bit_adamw_keeps_8bit_state_on_the_cpu(tiny_model, tokenizer, tmp_path):
    # bitsandbytes quantizes the state of tensors of 4096+ elements (min_8bit_size); the rest stay fp32.
    trainer = SFTTrainer(
        model=tiny_model,
        args=quick_args(tmp_path, optim="adamw_8bit", max_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    trainer.train()
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    state = trainer.optimizer.state[weight]
    assert weight.numel() >= 4096
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_default_optimizer_is_torchs_fused_adamw_and_it_runs_on_the_cpu(tiny_model, tokenizer, tmp_path):
    args = quick_args(tmp_path)
    assert (
        getattr(args.optim, "value", args.optim) == "adamw_torch_fused"
    )  # transformers' default with torch >= 2.8
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=ROWS, processing_class=tokenizer)
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


# ---- weight decay: not on norms or biases ----------------------------------------------------


def _is_norm_or_bias(model: torch.nn.Module, name: str) -> bool:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return leaf == "bias" or "norm" in type(module).__name__.lower()


def _qwen3(tokenizer):
    return Qwen3Config(**COMMON, head_dim=16, vocab_size=len(tokenizer), attention_bias=True)


def _gemma2(tokenizer):
    return Gemma2Config(**COMMON, head_dim=16, vocab_size=len(tokenizer))


CONFIGS = {
    "llama": lambda tok: tiny_config("llama", tok),
    "qwen2": lambda tok: tiny_config("qwen2", tok),  # q/k/v biases
    "gemma": lambda tok: tiny_config("gemma", tok),
    "qwen3": _qwen3,  # q_norm / k_norm inside attention, and attention biases
    "gemma2": _gemma2,  # pre_ / post_feedforward_layernorm
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_weight_decay_skips_norms_and_biases(tokenizer, tmp_path, arch):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch](tokenizer))
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, weight_decay=0.1),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    optimizer = trainer.create_optimizer()
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    expected_no_decay = {n for n in names.values() if _is_norm_or_bias(trainer.model, n)}
    assert no_decay == expected_no_decay
    assert "model.embed_tokens.weight" in decay and "model.norm.weight" in no_decay
    assert any(n.endswith("input_layernorm.weight") for n in no_decay)
    if arch == "qwen3":
        assert {
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.0.self_attn.k_norm.weight",
        } <= no_decay
        assert "model.layers.0.self_attn.q_proj.bias" in no_decay
        assert "model.layers.0.self_attn.q_proj.weight" in decay


# ---- names and missing extras -----------------------------------------------------------------


def test_bitsandbytes_optimizer_list_matches_transformers():
    assert sorted(BITSANDBYTES_OPTIMIZERS) == sorted(o.value for o in _BITSANDBYTES_OPTIMIZERS)


def test_missing_bitsandbytes_names_the_quant_extra():
    problems = optimizer_problems("paged_adamw_8bit", installed=lambda package: package != "bitsandbytes")
    assert problems == [
        "optim: 'paged_adamw_8bit' needs bitsandbytes, which is not installed: pip install 'sftrainer[quant]'"
    ]
    assert optimizer_problems("adamw_torch", installed=lambda package: False) == []


@pytest.mark.skipif(is_installed("torchao"), reason="torchao is installed")
def test_missing_torchao_fails_when_the_config_is_built(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'adamw_torch_4bit' needs torchao.*pip install 'sftrainer\[torchao\]'"
    ):
        SFTConfig(output_dir=str(tmp_path), optim="adamw_torch_4bit")
    # The YAML / command-line path reports it with the other problems, before a model is loaded.
    with pytest.raises(ConfigError, match=r"sftrainer\[torchao\]"):
        load_config(None, ["optim=adamw_torch_8bit", f"output_dir={tmp_path}"])


def test_unknown_optimizer_suggests_the_closest_name(tmp_path):
    with pytest.raises(ConfigError, match=r"optim: .*got 'adamw_8bt' \(did you mean 'adamw_8bit'\?\)"):
        SFTConfig(output_dir=str(tmp_path), optim="adamw_8bt")
