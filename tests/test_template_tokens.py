"""Tokens a ``chat_template_path`` template needs that the model lacks (TRL's ``clone_chat_template``):
added to the tokenizer's copy, rows grown in the model (to a multiple of 64), and trained, through
PEFT's ``trainable_token_indices`` with LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PromptEncoderConfig, get_peft_model
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrainer import ConfigError, SFTTrainer, template_tokens
from sftrainer.constants import EMBEDDING_MULTIPLE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

TEMPLATE = (
    "{% for m in messages %}{{ '<|turn|>' + m['role'] + '\\n' + m['content'] + '<|end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn|>assistant\\n' }}{% endif %}"
)
NEW = ["<|turn|>", "<|end|>"]  # what the template writes, and its EOS; the built-in tokenizer lacks both
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]}
    for r in ROWS
]


@pytest.fixture
def source_dir(tokenizer, tmp_path):
    """A tokenizer whose template writes <|turn|> and <|end|> (its EOS); <|unused|> it never writes."""
    source = copy.deepcopy(tokenizer)
    source.add_special_tokens({"additional_special_tokens": [*NEW, "<|unused|>"]})
    source.eos_token = "<|end|>"
    source.chat_template = TEMPLATE
    source.save_pretrained(tmp_path / "source")
    return str(tmp_path / "source")


def _trainer(model, source_dir, tmp_path, **kw) -> SFTTrainer:
    args = quick_args(tmp_path / "out", chat_template_path=source_dir, max_length=128, **kw)
    return SFTTrainer(model=model, args=args, train_dataset=CONVERSATIONS)


def _rows(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids)).detach().clone()


def test_the_tokens_added_are_those_the_template_writes(tokenizer, source_dir):
    source = AutoTokenizer.from_pretrained(source_dir)
    added = template_tokens.template_tokens(source, TEMPLATE, tokenizer)
    assert [t.content for t in added] == NEW  # not <|unused|>, not the tokens the tokenizer has
    assert template_tokens.template_tokens(source, TEMPLATE, source) == []


def test_embeddings_grow_to_a_multiple_of_64_and_keep_their_rows(tiny_model_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(NEW)
    ids = template_tokens.new_token_ids(tokenizer, grown)
    assert ids == [len(tokenizer), len(tokenizer) + 1]
    old_rows = model.get_input_embeddings().weight.shape[0]
    before = model.get_input_embeddings().weight.detach().clone()
    template_tokens.grow_embeddings(model, grown, ids, callers_model=False)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows % EMBEDDING_MULTIPLE == 0 and len(grown) <= rows < len(grown) + EMBEDDING_MULTIPLE
    assert torch.equal(model.get_input_embeddings().weight[:old_rows], before)
    template_tokens.grow_embeddings(model, grown, ids, callers_model=False)  # they fit now: unchanged
    assert model.get_input_embeddings().weight.shape[0] == rows


def test_full_fine_tune_adds_the_tokens_and_trains_their_rows(
    tiny_model_dir, tokenizer, source_dir, tmp_path
):
    trainer = _trainer(str(tiny_model_dir), source_dir, tmp_path)
    tok = trainer.processing_class
    ids = tok.convert_tokens_to_ids(NEW)
    assert ids == [len(tokenizer), len(tokenizer) + 1] and "<|unused|>" not in tok.get_vocab()
    assert len(tokenizer) + 2 == len(tok)  # the copy grew, not the tokenizer the model came with
    assert tok.eos_token == "<|end|>"
    assert trainer.model.get_input_embeddings().weight.shape[0] % EMBEDDING_MULTIPLE == 0
    row = trainer.train_dataset[0]
    assert ids[0] in row["input_ids"] and ids[1] in [
        t for t, lab in zip(row["input_ids"], row["labels"]) if lab >= 0
    ]
    before = _rows(trainer.model, ids)
    trainer.train()
    assert not torch.equal(_rows(trainer.model, ids), before)
    trainer.save_model(tmp_path / "final")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(_rows(saved, ids), _rows(trainer.model, ids))
    assert AutoTokenizer.from_pretrained(tmp_path / "final").convert_tokens_to_ids(NEW) == ids


def test_lora_trains_the_new_rows_and_leaves_the_others(tiny_model_dir, source_dir, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = quick_args(tmp_path / "out", chat_template_path=source_dir, max_length=128)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=CONVERSATIONS, peft_config=lora)
    assert lora.trainable_token_indices is None  # the caller's config is left as it was
    config = trainer.model.peft_config["default"]
    ids = trainer.processing_class.convert_tokens_to_ids(NEW)
    assert config.trainable_token_indices == {"model.embed_tokens": ids}  # lm_head is tied here
    old = [0, 5, 17]
    new_before, old_before = _rows(trainer.model, ids), _rows(trainer.model, old)
    trainer.train()
    assert not torch.equal(_rows(trainer.model, ids), new_before)
    assert torch.equal(_rows(trainer.model, old), old_before)


def test_methods_that_cannot_train_the_rows_are_refused(tiny_model_dir, source_dir, tmp_path):
    prompt = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32)
    args = quick_args(tmp_path / "out", chat_template_path=source_dir)
    with pytest.raises(ConfigError, match="PEFT PromptEncoderConfig cannot train their embedding rows"):
        SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=CONVERSATIONS, peft_config=prompt)
    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4))
    rows = adapted.get_input_embeddings().weight.shape[0]
    with pytest.raises(ConfigError, match="already carries a PEFT adapter"):
        SFTTrainer(model=adapted, args=args, train_dataset=CONVERSATIONS)
    assert adapted.get_input_embeddings().weight.shape[0] == rows  # refused before any change
