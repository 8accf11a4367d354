"""SFTTrainer with packing / padding-free batches, and gradient-accumulation equivalence."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, IterableDataset
from tiny_models import quick_args
from transformers import AttentionInterface, AutoModelForCausalLM, TrainerCallback
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from sftrainer import ConfigError, SFTConfig, SFTTrainer
from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.collate import PaddedCollator, PositionCollator
from sftrainer.errors import ContaminationError

pytestmark = pytest.mark.slow

WORDS = [
    "apple",
    "berry",
    "cat",
    "dog",
    "egg",
    "fish",
    "goat",
    "hat",
    "ink",
    "jam",
    "kite",
    "lamp",
    "moon",
    "nut",
    "owl",
    "pig",
]


def _rows(n: int) -> list[dict]:
    # Different prompt and response lengths, so per-batch means and per-token means differ.
    return [
        {
            "prompt": "Repeat: " + " ".join(WORDS[(i + k) % 16] for k in range(1 + i % 5)),
            "response": " ".join(WORDS[(3 * i + k) % 16] for k in range(1 + (i * 7) % 9)),
        }
        for i in range(n)
    ]


def _args(tmp_path, **overrides) -> SFTConfig:
    defaults = dict(per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3, logging_steps=1)
    return quick_args(tmp_path / "out", **{**defaults, **overrides})


def test_packing_prepares_packed_rows_and_trains(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=_args(tmp_path, packing=True),
        train_dataset=_rows(40),
        eval_dataset=_rows(8),
    )
    ds = trainer.train_dataset
    assert set(ds.column_names) == {"input_ids", "labels", "position_ids", "seq_lengths"}
    stats = trainer.pack_stats["train data"]
    assert stats.rows == 40 and stats.sequences == len(ds) < 40
    assert all(len(r) <= 64 for r in ds["input_ids"])
    assert sum(p.count(0) for p in ds["position_ids"]) == 40  # every row kept, each restarting at 0
    assert "eval data" in trainer.pack_stats  # eval_packing follows packing by default
    assert isinstance(trainer.data_collator, PositionCollator) and not trainer.data_collator.flatten
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert "eval_loss" in trainer.evaluate()


def test_padding_free_without_packing_uses_one_flat_row(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir), args=_args(tmp_path, padding_free=True), train_dataset=_rows(12)
    )
    assert "position_ids" not in trainer.train_dataset.column_names
    collator = trainer.data_collator
    assert isinstance(collator, PositionCollator) and collator.flatten
    batch = collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    trainer.train()


def test_bfd_split_splits_long_rows_and_counts_them(tiny_model_dir, tmp_path):
    rows = [*_rows(6), {"prompt": "Say:", "response": " ".join(WORDS * 4)}]
    args = _args(tmp_path, packing=True, packing_strategy="bfd_split", max_length=32)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows)
    assert trainer.pack_stats["train data"].split_rows == 1
    assert trainer.data_stats["train data"].truncated == 0
    assert all(len(r) <= 32 for r in trainer.train_dataset["input_ids"])


def test_a_streaming_dataset_is_packed_on_the_fly_and_trains(tiny_model_dir, tmp_path):
    rows = _rows(40)
    args = _args(tmp_path, packing=True, shuffle_dataset=False)
    stream = SFTTrainer(
        model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows).to_iterable_dataset()
    )
    mapped = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows)
    assert isinstance(stream.train_dataset, IterableDataset)
    # One window holds all 40 rows here, so the stream packs them as the map-style data set does.
    assert list(stream.train_dataset) == mapped.train_dataset.to_list()
    assert isinstance(stream.data_collator, PositionCollator)
    result = stream.train()
    assert stream.state.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))


def test_bad_packing_strategy_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"packing_strategy.*did you mean 'bfd'"):
        _args(tmp_path, packing=True, packing_strategy="bdf")


def _leaky_attention(module, query, key, value, attention_mask, **kwargs):
    """Causal attention that ignores the mask transformers builds: packed rows see each other."""
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


def test_an_attention_backend_that_leaks_is_refused_before_any_optimizer_step(tiny_model_dir, tmp_path):
    AttentionInterface.register("leaky_for_test", _leaky_attention)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="leaky_for_test")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SFTTrainer(model=model, args=_args(tmp_path, packing=True), train_dataset=_rows(8))
    with pytest.raises(ContaminationError, match="leaky_for_test"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ContaminationError, match="leaky_for_test"):
        trainer.evaluate(trainer.train_dataset)  # evaluating packed rows outside training: checked too
    # Without packing the same model trains: rows are padded, never mixed.
    SFTTrainer(model=model, args=_args(tmp_path), train_dataset=_rows(8))


def test_isolation_is_checked_on_the_model_as_it_trains_not_as_it_was_built(tiny_model_dir, tmp_path):
    """A backend switched after the trainer was built (as placement on a GPU or a kernel choice can)
    is the one checked: the check runs at train time."""
    AttentionInterface.register("leaky_for_test", _leaky_attention)
    trainer = SFTTrainer(
        model=str(tiny_model_dir), args=_args(tmp_path, packing=True), train_dataset=_rows(8)
    )
    trainer.model.config._attn_implementation = "leaky_for_test"
    with pytest.raises(ContaminationError, match="leaky_for_test"):
        trainer.train()
    assert trainer.state.global_step == 0


class _StopAtTrainBegin(TrainerCallback):
    """Ends train() right after the callbacks before it ran (a bf16 step on the CPU takes seconds)."""

    class Stop(Exception):
        pass

    def on_train_begin(self, args, state, control, **kwargs):
        raise self.Stop


def test_isolation_check_runs_on_the_training_device_under_the_training_autocast(
    tiny_model_dir, tmp_path, monkeypatch
):
    seen = []

    def record(model, collator, compute_dtype=None):
        seen.append(
            {
                "device": next(model.parameters()).device,
                "compute_dtype": compute_dtype,
                "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                "optimizer_steps": trainer.state.global_step,
            }
        )

    monkeypatch.setattr("sftrainer.trainer_data.check_row_isolation", record)
    args = _args(tmp_path, packing=True, bf16=True, use_cpu=True)  # bf16 autocast on the CPU
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=_rows(8))
    assert seen == []  # not at construction
    trainer.add_callback(_StopAtTrainBegin())
    with pytest.raises(_StopAtTrainBegin.Stop):
        trainer.train()
    assert seen == [
        {
            "device": trainer.args.device,
            "compute_dtype": torch.bfloat16,
            "autocast": torch.bfloat16,
            "optimizer_steps": 0,
        }
    ]


def test_isolation_check_passes_under_bf16_autocast(tiny_model_dir, tmp_path, caplog):
    args = _args(tmp_path, packing=True, bf16=True, use_cpu=True)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=_rows(8))
    trainer.add_callback(_StopAtTrainBegin())
    with caplog.at_level("INFO", logger="sftrainer.isolation"), pytest.raises(_StopAtTrainBegin.Stop):
        trainer.train()
    assert "Packed rows are isolated with attn_implementation='sdpa' on cpu in bfloat16" in caplog.text


def test_isolation_is_checked_and_logged_once_per_run(tiny_model_dir, tmp_path, caplog):
    """The evaluation before training, training and the evaluation after it (what `sftrainer train`
    runs) test the same model under the same conditions: one check, one line."""
    args = _args(tmp_path, packing=True, eval_strategy="steps", eval_steps=2)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=_rows(8), eval_dataset=_rows(4))
    with caplog.at_level("INFO", logger="sftrainer.isolation"):
        trainer.evaluate(metric_key_prefix="eval_before")
        trainer.train()
        trainer.evaluate()
    assert caplog.text.count("Packed rows are isolated") == 1, caplog.text


# ---- gradient accumulation ----------------------------------------------------------------


def _one_step(tiny_model_dir, tmp_path, batch: int, accumulation: int, **extra) -> tuple[float, dict]:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = _args(
        tmp_path / f"{batch}x{accumulation}",
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        **extra,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=_rows(8))
    trainer.train()
    loss = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
    return loss, {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("extra", [{}, {"padding_free": True}], ids=["padded", "padding_free"])
def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, tmp_path, extra):
    """8 x 1 and 2 x 4 are the same optimizer step: the loss is a mean over all trained tokens."""
    rows = Dataset.from_list(_rows(8))
    counts = [sum(x != IGNORE_INDEX for x in r[1:]) for r in _prepared_labels(tiny_model_dir, tmp_path, rows)]
    assert len(set(counts)) > 2  # rows differ in trained tokens, so naive averaging would differ
    loss_big, weights_big = _one_step(tiny_model_dir, tmp_path, 8, 1, **extra)
    loss_acc, weights_acc = _one_step(tiny_model_dir, tmp_path, 2, 4, **extra)
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name, value in weights_big.items():
        torch.testing.assert_close(weights_acc[name], value, atol=1e-6, rtol=1e-5, msg=name)


def _prepared_labels(tiny_model_dir, tmp_path, rows) -> list[list[int]]:
    trainer = SFTTrainer(model=str(tiny_model_dir), args=_args(tmp_path), train_dataset=rows)
    return trainer.train_dataset["labels"]


def test_padded_and_padding_free_collators_agree_on_trained_tokens(tiny_model_dir, tmp_path):
    trainer = SFTTrainer(model=str(tiny_model_dir), args=_args(tmp_path), train_dataset=_rows(5))
    rows = [trainer.train_dataset[i] for i in range(5)]
    padded = PaddedCollator(pad_token_id=0)(rows)["labels"]
    flat = PositionCollator(pad_token_id=0, flatten=True)(rows)["labels"]
    assert padded[padded != IGNORE_INDEX].tolist() == flat[flat != IGNORE_INDEX].tolist()
