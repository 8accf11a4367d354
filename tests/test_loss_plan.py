"""How the trainer computes its loss: decided once and logged, and equal to the model's own loss for
MoE models (router load-balancing loss included), PEFT prompt tuning / p-tuning and models without
``logits_to_keep``; DFT as TRL defines it."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from peft import PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM, LlamaForCausalLM, MixtralConfig

from sftrainer import ConfigError, SFTTrainer
from sftrainer.constants import IGNORE_INDEX

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def _trainer(model, tokenizer, tmp_path, **kw) -> SFTTrainer:
    return SFTTrainer(
        model=model, args=quick_args(tmp_path, **kw), train_dataset=ROWS, processing_class=tokenizer
    )


def _batch(trainer: SFTTrainer) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])


def _losses(trainer: SFTTrainer) -> tuple[float, float]:
    """(trainer's loss, model's own loss) on one batch of every row, without gradient accumulation."""
    batch = _batch(trainer)
    model = trainer.model
    with torch.no_grad():
        ours = trainer.compute_loss(model, batch)
        own = model(**batch, use_cache=False).loss
    return float(ours), float(own)


class NoLogitsToKeep(LlamaForCausalLM):
    """A causal LM whose forward has no ``logits_to_keep`` (as older or custom models)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None):
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            use_cache=use_cache,
        )


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (
            {},
            "in chunks of 16,777,216 logits; no full-vocabulary logits (LlamaForCausalLM takes logits_to_keep)",
        ),
        ({"label_smoothing_factor": 0.1}, "Trainer.compute_loss (label_smoothing_factor > 0"),
        ({"loss_type": "dft"}, "Loss: dft over trained tokens"),
    ],
)
def test_the_loss_is_decided_once_and_logged_with_the_reason(
    tiny_model_dir, tokenizer, tmp_path, caplog, kw, expected
):
    with caplog.at_level(logging.INFO, logger="sftrainer.trainer"):
        trainer = _trainer(str(tiny_model_dir), tokenizer, tmp_path, **kw)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Loss:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert trainer.loss_plan.describe() == lines[0]


def test_a_model_without_logits_to_keep_gets_the_same_loss_from_full_logits(
    tiny_model_dir, tokenizer, tmp_path
):
    trainer = _trainer(NoLogitsToKeep.from_pretrained(tiny_model_dir), tokenizer, tmp_path)
    assert trainer.loss_plan.kind == "full" and "takes no logits_to_keep" in trainer.loss_plan.reason
    ours, own = _losses(trainer)
    assert ours == pytest.approx(own, rel=1e-5)


def test_compute_loss_func_is_used_and_metrics_still_come(tiny_model_dir, tokenizer, tmp_path):
    calls = []

    def loss_func(outputs, labels, num_items_in_batch=None):
        calls.append(labels.shape)
        return outputs.logits.float().pow(2).mean()

    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, max_steps=1, logging_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
        compute_loss_func=loss_func,
    )
    assert trainer.loss_plan.kind == "trainer"
    trainer.train()
    assert calls
    assert "mean_token_accuracy" in trainer.state.log_history[0]


def test_dft_weights_token_losses_by_the_detached_target_probability(tiny_model_dir, tokenizer, tmp_path):
    trainer = _trainer(str(tiny_model_dir), tokenizer, tmp_path, loss_type="dft")
    batch = _batch(trainer)
    model = trainer.model
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    want = (nll * torch.exp(-nll).detach()).sum() / (labels != IGNORE_INDEX).sum()
    got = trainer.compute_loss(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Gradients flow through the log-probabilities only (the weight is detached).
    want.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    trainer.compute_loss(model, batch).backward()
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


# ---- MoE: the router load-balancing loss is part of the trained loss ------------------------------


def _mixtral(tokenizer, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )
    return AutoModelForCausalLM.from_config(config)


def test_moe_loss_includes_the_router_loss_like_the_models_own(tokenizer, tmp_path):
    trainer = _trainer(
        _mixtral(tokenizer, output_router_logits=True, router_aux_loss_coef=0.3), tokenizer, tmp_path
    )
    assert trainer.loss_plan.aux_coef == 0.3
    ours, own = _losses(trainer)
    assert ours == pytest.approx(own, rel=1e-5)
    trainer.model.train()
    ours_train, _ = _losses(trainer)
    assert ours_train == pytest.approx(own, rel=1e-5)  # train and eval agree


def test_router_aux_loss_coef_overrides_the_config_and_zero_turns_it_off(tokenizer, tmp_path):
    # As TRL: unset -> the config's coefficient, and the router loss is turned on even where the
    # checkpoint's config had output_router_logits=False.
    default = _trainer(_mixtral(tokenizer, router_aux_loss_coef=0.2), tokenizer, tmp_path)
    assert default.loss_plan.aux_coef == 0.2 and default.model.config.output_router_logits
    off = _trainer(
        _mixtral(tokenizer, output_router_logits=True), tokenizer, tmp_path, router_aux_loss_coef=0.0
    )
    assert off.loss_plan.aux_coef == 0.0 and not off.model.config.output_router_logits
    ours, own = _losses(off)
    assert ours == pytest.approx(own, rel=1e-5)  # the model's own loss has no router term now either
    stronger = _trainer(_mixtral(tokenizer), tokenizer, tmp_path, router_aux_loss_coef=1.5)
    assert stronger.model.config.router_aux_loss_coef == 1.5
    assert _losses(stronger)[0] == pytest.approx(_losses(stronger)[1], rel=1e-5)


def test_trainer_says_whether_the_router_loss_is_added_and_logs_it(tokenizer, tmp_path):
    # TRL's attributes: router_aux_loss_coef (the coefficient used) and aux_loss_enabled.
    trainer = _trainer(
        _mixtral(tokenizer, router_aux_loss_coef=0.3), tokenizer, tmp_path, max_steps=2, logging_steps=1
    )
    assert trainer.router_aux_loss_coef == 0.3 and trainer.aux_loss_enabled
    batch = _batch(trainer)
    with torch.no_grad():
        expected = float(trainer.model(**batch, use_cache=False).aux_loss)
    metrics = trainer.evaluate(ROWS)  # one batch of every row: its unweighted aux loss
    assert metrics["eval_aux_loss"] == pytest.approx(expected, rel=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(h["aux_loss"] > 0 for h in logs)
    off = _trainer(_mixtral(tokenizer), tokenizer, tmp_path / "off", router_aux_loss_coef=0.0, max_steps=1)
    assert off.router_aux_loss_coef == 0.0 and not off.aux_loss_enabled
    off.train()
    assert not [h for h in off.state.log_history if "aux_loss" in h]


def test_a_dense_model_adds_no_router_loss(tiny_model_dir, tokenizer, tmp_path):
    trainer = _trainer(str(tiny_model_dir), tokenizer, tmp_path)
    assert trainer.router_aux_loss_coef == 0.0 and not trainer.aux_loss_enabled


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tiny_model_dir, tokenizer, tmp_path):
    with pytest.raises(ConfigError, match="not a Mixture-of-Experts"):
        _trainer(str(tiny_model_dir), tokenizer, tmp_path, router_aux_loss_coef=0.1)


# ---- PEFT prompt learning: virtual tokens make the logits longer than the labels ------------------


@pytest.mark.parametrize(
    "peft_config",
    [
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, encoder_hidden_size=32),
    ],
    ids=["prompt_tuning", "p_tuning"],
)
def test_prompt_learning_loss_equals_the_models_own(tiny_model, tokenizer, tmp_path, peft_config):
    trainer = _trainer(get_peft_model(tiny_model, peft_config), tokenizer, tmp_path)
    assert trainer.loss_plan.virtual_tokens == 5
    trainer.model.eval()  # no dropout in the prompt encoder
    ours, own = _losses(trainer)
    assert ours == pytest.approx(own, rel=1e-5)
    trainer.model.train()
    assert trainer.train().training_loss > 0


def test_prompt_tuning_with_packing_is_refused(tiny_model, tokenizer, tmp_path):
    model = get_peft_model(tiny_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with pytest.raises(ConfigError, match="prompt tuning drops position_ids"):
        _trainer(model, tokenizer, tmp_path, packing=True)
