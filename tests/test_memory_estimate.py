"""The memory estimate (sftrainer/memory_estimate.py): each part of the formula, and the shape read from a
meta-device model (no weights loaded) equal to the loaded model's, with and without LoRA.
"""

from __future__ import annotations

from sftrainer.memory_estimate import ModelShape, estimate_memory, meta_model, model_shape

SHAPE = ModelShape(
    params=1000, trainable=1000, frozen_bytes=0, fp32_params=1000, half_frozen=False,
    hidden=16, layers=2, intermediate=32, kv_dim=8, heads=2, vocab=50,
)  # fmt: skip


def test_memory_formula_parts():
    est = estimate_memory(SHAPE, batch_size=2, seq_len=10, mixed_precision=False)
    assert est.weights == 4 * 1000 and est.gradients == 4 * 1000 and est.optimizer == 8 * 1000
    per_token_layer = 10 * 16 + 3 * 8 + 4 * 32
    assert est.activations == 2 * (2 * 10 * per_token_layer * 4)
    assert est.logits == 2 * 10 * 50 * (4 + 8)
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations + est.logits
    mixed = estimate_memory(SHAPE, 2, 10, mixed_precision=True)
    assert mixed.weights == 6 * 1000 and mixed.activations == est.activations // 2
    checkpointed = estimate_memory(SHAPE, 2, 10, mixed_precision=False, gradient_checkpointing=True)
    assert checkpointed.activations < est.activations
    eager = estimate_memory(SHAPE, 2, 10, mixed_precision=False, eager_attention=True)
    assert eager.activations - est.activations == 2 * (2 * 2 * 2 * 10 * 10 * 4)
    assert estimate_memory(SHAPE, 2, 10, mixed_precision=False, optim="adamw_bnb_8bit").optimizer == 2000
    assert estimate_memory(SHAPE, 2, 10, mixed_precision=False, optim="sgd").optimizer == 0


def test_meta_model_shape_matches_the_loaded_model(tiny_model_dir, tiny_model):
    from sftrainer import lora
    from sftrainer.run_config import LoraSettings

    full = model_shape(meta_model(str(tiny_model_dir), "auto", False, None))
    loaded = model_shape(tiny_model)
    assert full == loaded  # no weights read, same numbers
    config = lora.peft_config_from(LoraSettings(r=4))
    adapted = model_shape(meta_model(str(tiny_model_dir), "bfloat16", False, config))
    real = lora.apply(tiny_model, config)
    trainable, total = real.get_nb_trainable_parameters()
    assert (adapted.trainable, adapted.params) == (trainable, total)
    assert adapted.half_frozen and adapted.frozen_bytes == 2 * (total - trainable)


def test_chunked_loss_holds_one_chunk_of_logits():
    full = estimate_memory(SHAPE, 2, 10, mixed_precision=False)
    chunked = estimate_memory(SHAPE, 2, 10, mixed_precision=False, logits_at_once=100)
    assert chunked.logits == 100 * (4 + 8) < full.logits
    assert estimate_memory(SHAPE, 2, 10, mixed_precision=False, logits_at_once=10**9).logits == full.logits
