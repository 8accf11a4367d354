"""Fine-tuning works across the architectures users bring: tiny random-init Llama, Mistral, Gemma,
Phi-3 and Qwen2, each saved with ``save_pretrained`` and given to ``SFTTrainer`` as a path string."""

from __future__ import annotations

import math

import pytest
from peft import LoraConfig, PeftModel
from tiny_models import (
    ARCHITECTURES,
    ROWS,
    changed,
    quick_args,
    save_tiny_model,
    trainable_snapshot,
    trained_text,
)

from sftrainer import SFTTrainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    root = tmp_path_factory.mktemp("architectures")
    return {arch: save_tiny_model(arch, tokenizer, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_trains_by_path(arch_dirs, tokenizer, tmp_path, arch, use_lora):
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if use_lora else None
    trainer = SFTTrainer(
        model=str(arch_dirs[arch]),
        args=quick_args(tmp_path, max_steps=2),
        train_dataset=ROWS,
        peft_config=peft_config,
    )
    model = trainer.model
    assert model.config.model_type == arch
    assert isinstance(model, PeftModel) is use_lora
    for row, raw in zip(trainer.train_dataset, ROWS):
        assert trained_text(tokenizer, row) == raw["response"] + "<|im_end|>"

    before = trainable_snapshot(model)
    if use_lora:
        assert before and all("lora_" in name for name in before)
        # "all-linear" reaches the attention and MLP projections of every layer (fused ones included).
        wrapped = {name.split(".lora_")[0] for name in before}
        assert len(wrapped) >= 2 * 3  # 2 layers x at least (qkv, o, mlp) projections
    else:
        assert len(before) == len(list(model.parameters()))
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert sorted(changed(model, before)) == sorted(before)
