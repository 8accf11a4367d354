"""The lean SFT loss equals the model's own loss, in value and gradients, on every batch layout."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.collate import PaddedCollator, PositionCollator
from sftrainer.loss import accepts_logits_to_keep, sft_loss, trained_positions


def _rows(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, cut in ((9, 4), (14, 10), (5, 2), (11, 6)):
        ids = torch.randint(5, vocab, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


def test_trained_positions_are_the_positions_before_trained_labels():
    labels = torch.tensor(
        [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX], [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, 9]]
    )
    assert trained_positions(labels).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "collator",
    [PaddedCollator(pad_token_id=0), PositionCollator(pad_token_id=0, flatten=True)],
    ids=["padded", "flat"],
)
def test_sft_loss_matches_the_model_loss_and_gradients(tiny_model_dir, collator):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert accepts_logits_to_keep(model)
    batch = collator(_rows(model.config.vocab_size))
    n_trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    reference = model(**batch, use_cache=False).loss  # transformers' mean over trained tokens
    reference.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    loss, outputs, _ = sft_loss(
        model, {**batch, "use_cache": False}, num_items_in_batch=torch.tensor(n_trained)
    )
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1]  # fewer logits than positions
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)
    loss.backward()
    for got, expected in zip((p.grad for p in model.parameters()), want):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_label_smoothing_is_not_bypassed_by_the_lean_loss(tiny_model_dir, tmp_path):
    from sftrainer import SFTConfig, SFTTrainer

    rows = [{"prompt": "Say a word", "response": "apple berry cat"}] * 4

    def loss_of(**extra) -> float:
        args = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none", **extra)
        trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        with torch.no_grad():
            return float(trainer.compute_loss(trainer.model, batch))

    plain, smoothed = loss_of(), loss_of(label_smoothing_factor=0.2)
    assert smoothed != pytest.approx(plain, rel=1e-3)
