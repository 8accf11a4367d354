"""The chunked loss (the default): equal to the model's own loss in value and gradients, for every head
and logit transform real models use, and it never builds a [positions, vocabulary] tensor, forward or
backward."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (
    AutoModelForCausalLM,
    CohereConfig,
    Gemma2Config,
    GraniteConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.collate import PaddedCollator, PositionCollator
from sftrainer.loss import CHUNKED, FULL, LEAN, plan_loss, sft_loss, verify_chunked

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

VOCAB = 300
SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=VOCAB,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL),
    "llama-tied": lambda: LlamaConfig(**SMALL, tie_word_embeddings=True),
    "gemma2-softcap": lambda: Gemma2Config(**SMALL, head_dim=16, final_logit_softcapping=2.0),
    "cohere-logit-scale": lambda: CohereConfig(**SMALL, logit_scale=0.5),
    "granite-logits-scaling": lambda: GraniteConfig(**SMALL, logits_scaling=4.0),
}
PADDED, FLAT = PaddedCollator(pad_token_id=0), PositionCollator(pad_token_id=0, flatten=True)


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=torch.float32)


def _rows(seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n, cut in ((9, 4), (14, 10), (5, 2), (11, 6)):
        ids = torch.randint(5, VOCAB, (n,), generator=gen).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _chunked(model, batch, chunk=3, **kw):
    plan = plan_loss(model, chunk_size=chunk, **kw)
    assert plan.kind == CHUNKED
    plan = verify_chunked(model, batch["input_ids"], plan)
    assert plan.kind == CHUNKED and plan.verified
    return sft_loss(model, {**batch, "use_cache": False}, plan=plan)


def _assert_grads_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("collator", [PADDED, FLAT], ids=["padded", "packed"])
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_chunked_loss_equals_the_models_own_loss_and_gradients(arch, collator):
    model = _model(arch)
    batch = collator(_rows())
    own = model(**batch, use_cache=False).loss  # transformers: mean over trained tokens
    want = _grads(model, own)

    loss, outputs, stats = _chunked(model, batch)
    assert outputs.logits.shape[1] == 0  # the head computed no position itself
    torch.testing.assert_close(loss, own, atol=1e-5, rtol=1e-5)
    _assert_grads_equal(_grads(model, loss), want)
    assert stats[0] == (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def test_tied_embeddings_get_the_head_and_embedding_gradients_together():
    model = _model("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batch = PADDED(_rows())
    want = _grads(model, model(**batch, use_cache=False).loss)
    got = _grads(model, _chunked(model, batch).loss)
    _assert_grads_equal(got, want)


@pytest.mark.parametrize(
    "peft_kw",
    [
        {"target_modules": ["q_proj", "lm_head"]},
        {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    ],
    ids=["lora-lm_head", "modules_to_save-lm_head"],
)
def test_a_wrapped_head_is_trained_through_the_chunked_loss(peft_kw):
    base = _model("gemma2-softcap")
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, **peft_kw)
    )
    batch = FLAT(_rows())
    want = _grads(model, model(**batch, use_cache=False).loss)
    got = _grads(model, _chunked(model, batch).loss)
    assert any("lm_head" in name for name in got)  # the head's adapter / copy is trained
    _assert_grads_equal(got, want)


def test_gradient_accumulation_gives_the_gradients_of_one_big_batch():
    model = _model("gemma2-softcap")
    rows = _rows()
    whole = PADDED(rows)
    n = int((whole["labels"][:, 1:] != IGNORE_INDEX).sum())
    want = _grads(model, model(**whole, use_cache=False).loss)
    model.zero_grad()
    plan = verify_chunked(model, whole["input_ids"], plan_loss(model, chunk_size=2))
    for part in (rows[:1], rows[1:]):  # unequal micro-batches, normalised by the step's token count
        batch = PADDED(part)
        sft_loss(model, {**batch, "use_cache": False}, torch.tensor(n), plan).loss.backward()
    got = {name: p.grad for name, p in model.named_parameters()}
    _assert_grads_equal(got, want)


def test_dft_and_statistics_match_the_loss_from_full_logits():
    model = _model("cohere-logit-scale")
    batch = FLAT(_rows())
    full_plan = replace(plan_loss(model, loss_type="dft"), kind=FULL)
    reference, _, ref_stats = sft_loss(model, {**batch, "use_cache": False}, plan=full_plan)
    want = _grads(model, reference)
    loss, _, stats = _chunked(model, batch, loss_type="dft")
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats, ref_stats, atol=1e-4, rtol=1e-5)  # tokens, top-1 hits, entropy
    _assert_grads_equal(_grads(model, loss), want)


class VocabSizedTensors(TorchDispatchMode):
    """Records the shape of every tensor an op produces that has a dimension of the vocabulary's size."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.shapes = vocab, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape:
                self.shapes.add(tuple(t.shape))
        return out


def _positions_times_vocab(shapes: set, vocab: int, hidden: int) -> int:
    """The most positions any vocabulary-sized tensor spans, the [vocab, hidden] weight and its gradient
    aside."""
    rows = [
        s.numel() // vocab for s in map(torch.Size, shapes) if s not in ((vocab, hidden), (hidden, vocab))
    ]
    return max(rows, default=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_no_tensor_spans_more_positions_than_a_chunk_forward_or_backward(arch):
    model = _model(arch)
    batch = FLAT(_rows() * 3)  # 117 tokens, 81 trained
    trained = int((batch["labels"] != IGNORE_INDEX).sum())
    chunk = 8
    with VocabSizedTensors(VOCAB) as seen:
        _chunked(model, batch, chunk=chunk).loss.backward()
    assert 0 < _positions_times_vocab(seen.shapes, VOCAB, 32) <= chunk

    # The same check on the model's own head (the ``lean`` plan) sees every trained position at once.
    model.zero_grad()
    lean = replace(plan_loss(model), kind=LEAN)
    with VocabSizedTensors(VOCAB) as seen:
        sft_loss(model, {**batch, "use_cache": False}, plan=lean).loss.backward()
    assert _positions_times_vocab(seen.shapes, VOCAB, 32) >= trained - 3


def test_evaluation_builds_no_full_vocabulary_logits_either():
    model = _model("llama")
    batch = FLAT(_rows() * 3)
    with torch.no_grad(), VocabSizedTensors(VOCAB) as seen:
        loss, _, _ = _chunked(model, batch, chunk=8)
    assert 0 < _positions_times_vocab(seen.shapes, VOCAB, 32) <= 8
    with torch.no_grad():
        torch.testing.assert_close(loss, model(**batch, use_cache=False).loss, atol=1e-5, rtol=1e-5)


class OddLogits(LlamaForCausalLM):
    """A model that does something to its logits the chunked loss does not know about."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits + 1.0 * torch.arange(out.logits.shape[-1], device=out.logits.device) / 100
        return out


def test_a_model_whose_logits_it_cannot_reproduce_falls_back_to_its_own_head(caplog):
    torch.manual_seed(0)
    model = OddLogits(LlamaConfig(**SMALL))
    batch = PADDED(_rows())
    plan = plan_loss(model)
    assert plan.kind == CHUNKED
    with caplog.at_level(logging.WARNING, logger="sftrainer.loss"):
        checked = verify_chunked(model, batch["input_ids"], plan)
    assert checked.kind == LEAN and "OddLogits" in checked.reason
    assert any("does not reproduce OddLogits's logits" in r.getMessage() for r in caplog.records)
    assert model.training  # the probe restored the training mode
    with torch.no_grad():
        loss = sft_loss(model, {**batch, "use_cache": False}, plan=checked).loss
        reference = sft_loss(model, {**batch, "use_cache": False}, plan=replace(checked, kind=FULL)).loss
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=1e-6)  # the model's own (odd) logits


@pytest.mark.parametrize("arch", ["llama", "gemma2-softcap"])
def test_bf16_autocast_keeps_the_chunked_loss_close_to_the_models_own(arch):
    model = _model(arch)
    batch = FLAT(_rows())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(**batch, use_cache=False).loss
        loss = _chunked(model, batch).loss
    want = _grads(model, own)
    got = _grads(model, loss)
    torch.testing.assert_close(loss, own, atol=2e-2, rtol=1e-2)
    for name in want:  # bf16 matmuls on both sides: same direction, bf16-sized differences
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_trainer_training_and_evaluation_never_build_full_vocabulary_logits(tiny_model_dir, tmp_path):
    from tiny_models import ROWS, quick_args

    from sftrainer import SFTTrainer

    rows = ROWS * 4
    args = quick_args(tmp_path, max_steps=1, per_device_train_batch_size=8, loss_chunk_size=4)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=rows, eval_dataset=rows)
    vocab = trainer.model.config.vocab_size
    hidden = trainer.model.config.hidden_size
    with VocabSizedTensors(vocab) as seen:
        trainer.train()
        metrics = trainer.evaluate()
    assert trainer.loss_plan.kind == CHUNKED and trainer.loss_plan.verified
    assert metrics["eval_num_tokens"] > 8 and metrics["eval_loss"] > 0
    # The one-time check of the model's logits runs the head on 8 positions; nothing spans more.
    assert _positions_times_vocab(seen.shapes, vocab, hidden) <= 8


def test_under_trainer_bf16_the_chunked_loss_runs_its_head_as_the_forward_ran(
    tiny_model_dir, tmp_path, caplog
):
    """Trainer leaves autocast to accelerate, which wraps the model's forward alone: compute_loss runs
    outside it. The chunked loss runs its head under the autocast the forward ran under (bf16 matmuls, as
    the model's own head), so its check against the model's logits passes and training stays chunked;
    before, the head ran in fp32, differed from the bf16 logits by ~3e-3 and fell back to `lean`."""
    from tiny_models import ROWS, quick_args

    import sftrainer.loss
    from sftrainer import SFTTrainer

    seen = []
    real = sftrainer.loss.linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return real(*args, **kwargs)

    args = quick_args(tmp_path, max_steps=1, bf16=True, use_cpu=True)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS)
    with caplog.at_level(logging.WARNING, logger="sftrainer.loss"):
        sftrainer.loss.linear_cross_entropy = spy
        try:
            trainer.train()
        finally:
            sftrainer.loss.linear_cross_entropy = real
    assert "does not reproduce" not in caplog.text
    assert trainer.loss_plan.kind == CHUNKED and trainer.loss_plan.verified
    assert seen and set(seen) == {torch.bfloat16}


def test_several_gpus_in_one_process_are_refused_with_the_launch_to_use(
    tiny_model_dir, tmp_path, monkeypatch
):
    from tiny_models import ROWS, quick_args

    from sftrainer import ConfigError, SFTConfig, SFTTrainer

    args = quick_args(tmp_path)
    monkeypatch.setattr(SFTConfig, "n_gpu", property(lambda self: 2))
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node 2"):
        SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS)


def test_evaluation_computes_no_gradients_inside_the_loss():
    model = _model("llama")
    batch = FLAT(_rows())
    plan = verify_chunked(model, batch["input_ids"], plan_loss(model, chunk_size=4))
    with torch.no_grad(), VocabSizedTensors(VOCAB) as seen:
        sft_loss(model, {**batch, "use_cache": False}, plan=plan)
    assert (VOCAB, 32) not in seen.shapes  # no [vocabulary, hidden] weight gradient was built
    sft_loss(model, {**batch, "use_cache": False}, plan=plan).loss.backward()
    assert model.lm_head.weight.grad is not None
