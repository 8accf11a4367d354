"""``trainer.save_model`` round trip: what it writes loads with plain transformers / peft and gives
the same logits as the trained model in memory; the tokenizer comes back with its chat template."""

from __future__ import annotations

import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrainer import SFTTrainer
from sftrainer.model import DEFAULT_CHAT_TEMPLATE

# peft 0.21 reads an attribute transformers 5 deprecated; not ours to fix.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def test_full_model_round_trip(tiny_model_dir, tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path / "run"),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))

    assert (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert not list(out.glob("*.bin")) or [p.name for p in out.glob("*.bin")] == ["training_args.bin"]
    ids = trainer.train_dataset[0]["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(reloaded, ids), logits(trainer.model, ids))
    # ... and the trained model differs from where it started, so the comparison means something.
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits(original, ids), logits(reloaded, ids))

    saved_tok = AutoTokenizer.from_pretrained(out)
    assert saved_tok.chat_template == tokenizer.chat_template
    assert saved_tok("Paris.")["input_ids"] == tokenizer("Paris.")["input_ids"]
    assert saved_tok.eos_token == tokenizer.eos_token and saved_tok.pad_token == tokenizer.pad_token


def test_lora_adapter_round_trip(tiny_model_dir, tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path / "run"),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
    )
    trainer.train()
    out = tmp_path / "adapter"
    trainer.save_model(str(out))

    assert (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir)
    assert adapter_config["r"] == 4

    ids = trainer.train_dataset[1]["input_ids"]
    expected = logits(trainer.model, ids)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = logits(base, ids)
    assert not torch.allclose(base_logits, expected), "the adapter did not change the model"
    with_peft = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(with_peft, ids), expected)
    auto = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(auto, ids), expected)
    # transformers' own PEFT integration reads the adapter directory as well.
    integrated = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(integrated, ids), expected)

    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template


def test_default_chat_template_is_saved(tiny_model_dir, tokenizer, tmp_path):
    """A tokenizer without a chat template gets sftrainer's default, and the saved tokenizer keeps it,
    so the saved model is prompted the way it was trained."""
    tokenizer.chat_template = None
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path / "run", max_steps=1),
        train_dataset=ROWS[:2],
        processing_class=tokenizer,
    )
    assert "### Assistant:" in trainer.processing_class.chat_template
    assert trainer.processing_class.chat_template.startswith("{{ bos_token }}")
    assert trainer.processing_class.chat_template.endswith(DEFAULT_CHAT_TEMPLATE[-60:])
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded.chat_template == trainer.processing_class.chat_template
    prompt = reloaded.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt == "<s>### User:\nHi\n\n### Assistant:\n"
