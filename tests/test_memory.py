"""Gradient checkpointing (non-reentrant by default; same gradients as without it, full fine-tune and
LoRA, padded and packed batches) and activation offloading (refused on the CPU with a specific
message; the hooks leave CPU tensors and parameters where they are)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig
from tiny_models import quick_args
from transformers import AutoModelForCausalLM, TrainerCallback

from sftrainer import ConfigError, SFTConfig, SFTTrainer
from sftrainer.memory import (
    checkpointing_kwargs,
    offload_hooks,
    offload_saved_tensors,
    offloading_problems,
    should_offload,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning"),
]

NO_CUDA = not torch.cuda.is_available()
# fp32. Measured on the 2-core CPU: bit-identical (largest difference 0) in all four cases; the
# recomputed forward runs the same kernels on the same inputs.
GRAD_TOLERANCE = 1e-6
ROWS = [
    {"prompt": "Repeat: apple berry cat", "response": "apple berry cat"},
    {"prompt": "Who wrote Hamlet?", "response": "William Shakespeare."},
    {"prompt": "Count the words: sun sun sun sun", "response": "4"},
    {"prompt": "Reverse the words: cat dog egg fish", "response": "fish egg dog cat"},
]


class _GradsBeforeStep(TrainerCallback):
    """Copies the gradients of the first optimizer step (after clipping, before the update)."""

    def __init__(self, model: torch.nn.Module, calls: list):
        self.model, self.grads, self.calls = model, None, calls

    def on_step_begin(self, args, state, control, **kwargs):
        self.calls.clear()  # forward passes before the step (the packed-row isolation check) do not count

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None
            }


def _first_step_grads(model_dir, tmp_path, checkpointing: bool, lora: bool, packing: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    layer_calls = []
    # A module inside the block: the block checkpoints its forward, which re-runs inside backward.
    # No-grad forwards (the chunked loss's one-time check of the model's logits) do not count.
    model.model.layers[0].mlp.register_forward_pre_hook(
        lambda module, args: layer_calls.append(1) if torch.is_grad_enabled() else None
    )
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if lora else None
    )
    args = quick_args(
        tmp_path / f"gc-{checkpointing}",
        max_steps=1,
        per_device_train_batch_size=4,
        max_grad_norm=0.0,  # no clipping: compare the raw gradients
        packing=packing,
        gradient_checkpointing=checkpointing,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ROWS, peft_config=peft_config)
    grads = _GradsBeforeStep(trainer.model, layer_calls)
    trainer.add_callback(grads)
    trainer.train()
    assert grads.grads, "no gradients"
    # Checkpointing re-runs each block's forward during backward.
    assert len(layer_calls) == (2 if checkpointing else 1)
    return grads.grads, trainer


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tmp_path, lora, packing):
    plain, _ = _first_step_grads(tiny_model_dir, tmp_path, False, lora, packing)
    checkpointed, trainer = _first_step_grads(tiny_model_dir, tmp_path, True, lora, packing)
    if packing:
        assert "position_ids" in trainer.train_dataset.column_names
    assert trainer.args.activation_checkpointing_kwargs == {"use_reentrant": False}
    assert plain.keys() == checkpointed.keys()
    if lora:
        assert all("lora_" in n for n in plain)
    worst = max((plain[n] - checkpointed[n]).abs().max().item() for n in plain)
    assert worst <= GRAD_TOLERANCE, f"largest gradient difference {worst:.3g}"
    assert any(g.abs().max() > 0 for g in plain.values())


def test_checkpointing_is_non_reentrant_by_default_without_touching_the_callers_args(tiny_model, tmp_path):
    args = quick_args(
        tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"preserve_rng_state": False}
    )
    given = dict(args.activation_checkpointing_kwargs)
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=ROWS)
    assert trainer.args.activation_checkpointing_kwargs == {
        "use_reentrant": False,
        "preserve_rng_state": False,
    }
    assert trainer.args.gradient_checkpointing_kwargs == trainer.args.activation_checkpointing_kwargs
    assert args.activation_checkpointing_kwargs == given  # the caller's config is left as it was


def test_a_users_use_reentrant_is_kept():
    assert checkpointing_kwargs(True, {"use_reentrant": True}) == {"use_reentrant": True}
    assert checkpointing_kwargs(True, None) == {"use_reentrant": False}
    assert checkpointing_kwargs(False, None) is None


def test_gradient_checkpointing_set_after_the_config_is_built_still_applies(tiny_model, tmp_path):
    # transformers 5.x reads activation_checkpointing; TRL scripts set gradient_checkpointing.
    args = quick_args(tmp_path, max_steps=1)
    args.gradient_checkpointing = True
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=ROWS)
    assert trainer.args.activation_checkpointing is True
    trainer.train()
    assert tiny_model.is_activation_checkpointing
    assert args.activation_checkpointing is False  # the caller's copy is not the trainer's


def test_checkpointing_resolves_where_transformers_has_no_activation_checkpointing():
    """transformers 5.17 (what the lent GPU machine has) has gradient_checkpointing alone; the trainer
    used to read activation_checkpointing and stopped with an AttributeError (bench/gpu_check.py's dry run
    with transformers 5.17 found it)."""
    from types import SimpleNamespace

    from sftrainer.trainer_args import resolve_checkpointing

    args = SimpleNamespace(gradient_checkpointing=True, gradient_checkpointing_kwargs=None)
    resolve_checkpointing(args)
    assert args.gradient_checkpointing is True
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert not hasattr(args, "activation_checkpointing")


def test_checkpointing_off_by_default(tiny_model, tmp_path):
    trainer = SFTTrainer(model=tiny_model, args=quick_args(tmp_path), train_dataset=ROWS)
    assert (
        trainer.args.activation_checkpointing is False
        and trainer.args.activation_checkpointing_kwargs is None
    )


# ---- activation offloading ---------------------------------------------------------------------


@pytest.mark.skipif(not NO_CUDA, reason="the refusal applies without a CUDA GPU")
def test_activation_offloading_is_refused_without_a_gpu(tmp_path):
    with pytest.raises(ConfigError, match="no CUDA GPU is visible") as err:
        SFTConfig(output_dir=str(tmp_path), activation_offloading=True)
    message = str(err.value)
    assert "Set activation_offloading=false" in message and "activation_checkpointing=true" in message


def test_activation_offloading_is_refused_with_use_cpu():
    (problem,) = offloading_problems(True, use_cpu=True)
    assert problem.startswith("activation_offloading: ") and "use_cpu=True trains on the CPU" in problem
    assert offloading_problems(False, use_cpu=True) == []


def test_offload_context_is_null_when_off():
    assert isinstance(offload_saved_tensors(False), contextlib.nullcontext)


def test_offload_hooks_leave_cpu_tensors_and_parameters_alone():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    x = torch.randn(3, 4, requires_grad=True)
    assert not should_offload(weight) and not should_offload(x)
    pack, unpack = offload_hooks()
    for tensor in (weight, x, x @ weight):
        assert pack(tensor) is tensor and unpack(pack(tensor)) is tensor
    with offload_saved_tensors(True):
        (x @ weight).sin().sum().backward()
    expected_x, expected_w = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    (x @ weight).sin().sum().backward()
    assert torch.equal(x.grad, expected_x) and torch.equal(weight.grad, expected_w)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_offload_moves_activations_but_not_parameters_on_cuda():
    weight = torch.nn.Parameter(torch.randn(64, 64, device="cuda"))
    x = torch.randn(32, 64, device="cuda", requires_grad=True)
    activation = x @ weight
    assert should_offload(activation) and not should_offload(weight)
    pack, unpack = offload_hooks()
    packed = pack(activation)
    assert packed.host.device.type == "cpu" and torch.equal(unpack(packed), activation)
    with offload_saved_tensors(True):
        y = (x @ weight).sin().sum()
    y.backward()
    expected_x, expected_w = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    (x @ weight).sin().sum().backward()
    torch.testing.assert_close(x.grad, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, expected_w, rtol=0, atol=0)
