"""The NaN / inf guard (sftrainer/nonfinite.py): a non-finite loss stops training before the optimizer
applies it, without a host-device sync per micro-batch."""

from __future__ import annotations

import traceback

import pytest
import torch
from tiny_models import ROWS, quick_args, trainable_snapshot
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from sftrainer import SFTTrainer
from sftrainer.errors import NonFiniteLossError
from sftrainer.nonfinite import NonFiniteFlag


class CountSyncs(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense``, what ``.item()``, ``bool(t)`` and ``float(t)`` dispatch to (a
    host-device sync on a GPU), except while ``paused``; ``where``: the sftrainer function of each."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs, self.paused, self.where = 0, False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.syncs += 1
            ours = [f.name for f in traceback.extract_stack() if "/sftrainer/" in f.filename]
            self.where.append(ours[-1] if ours else "transformers")
        return func(*args, **(kwargs or {}))


class CountStepSyncs(TrainerCallback):
    """The syncs of each optimizer step, from ``on_step_begin`` to ``on_step_end``: every micro-batch's
    forward, loss, backward and Trainer's own loop around them, gradient clipping, the optimizer and the
    scheduler; not the data loading before it, nor the logging / saving after it. Paused inside the
    model's forward: transformers' mask code reads the batch there once per forward (masking_utils'
    packed-sequence and causal-skip checks), which is not sftrainer's."""

    def __init__(self, model):
        self.counter: CountSyncs | None = None
        self.steps: list[CountSyncs] = []
        model.register_forward_pre_hook(lambda *_: self._pause(True))
        model.register_forward_hook(lambda *_: self._pause(False))

    def _pause(self, paused: bool) -> None:
        if self.counter is not None:
            self.counter.paused = paused

    def on_step_begin(self, args, state, control, **kwargs):
        self.counter = CountSyncs()
        self.counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        assert self.counter is not None
        self.counter.__exit__(None, None, None)
        self.steps.append(self.counter)
        self.counter = None


@pytest.mark.parametrize("packing", [False, True])
def test_no_host_device_sync_on_steps_that_do_not_log(tiny_model_dir, tmp_path, packing):
    """Zero ``.item()`` on a step that does not log or save: the NaN flag stays on the device (the fused
    optimizer skips a NaN step itself), token metrics accumulate on the device, and transformers'
    per-micro-batch ``logging_nan_inf_filter`` check is off in training. The first step also checks the
    chunked loss against the model's own logits, once (``loss.verify_chunked``)."""
    args = quick_args(
        tmp_path, max_steps=4, gradient_accumulation_steps=2, logging_steps=100, packing=packing
    )
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS * 4)
    count = CountStepSyncs(trainer.model)
    trainer.add_callback(count)
    trainer.train()
    assert len(count.steps) == 4
    assert set(count.steps[0].where) <= {"verify_chunked"}
    assert [c.syncs for c in count.steps[1:]] == [0, 0, 0], [c.where for c in count.steps]
    assert trainer.args.logging_nan_inf_filter is True  # the caller's setting, back after training


class PoisonMicroBatch(TrainerCallback):
    """Sets one weight to NaN after the first micro-batch of optimizer step ``step`` (1-based)."""

    def __init__(self, step: int):
        self.step, self.seen, self.before = step, 0, None

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = trainable_snapshot(model)
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")


@pytest.mark.parametrize("optim", ["adamw_torch_fused", "adamw_torch"])
def test_a_nan_in_a_later_micro_batch_never_reaches_the_weights(tiny_model_dir, tmp_path, optim):
    """The fused optimizer (transformers' default) skips the step on the device and the flag is read at
    the end (no log, no save in between): steps 2-3 skipped. Another optimizer: read before step 2."""
    args = quick_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, optim=optim)
    poison = PoisonMicroBatch(2)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, callbacks=[poison])
    fused = optim == "adamw_torch_fused"
    skipped = (
        r" \(nor the steps after it: the optimizer skipped steps 2-3 on the device" if fused else ", and"
    )
    with pytest.raises(NonFiniteLossError, match=r"^the training loss is nan at step 2; training stopped "
                       r"before applying it" + skipped):  # fmt: skip
        trainer.train()
    assert trainer._nonfinite_on_device is fused
    # no update after step 1: every weight but the poisoned one is as it was then
    after = trainable_snapshot(trainer.model)
    assert trainer.state.global_step == (3 if fused else 1)
    poisoned = next(iter(poison.before))
    assert all(torch.equal(after[n], w) for n, w in poison.before.items() if n != poisoned)
    if fused:  # the skipped steps left the optimizer's state as it was after step 1 too
        state = trainer.optimizer.optimizer.state
        assert {float(s["step"]) for s in state.values()} == {1.0}
        assert not hasattr(trainer.optimizer.optimizer, "found_inf")  # handed back after each step


class CountingTrainer(SFTTrainer):
    micro_batches = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches += 1
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize(
    ("read", "logging_steps", "micro_batches"),
    [("micro_batch", 500, 5), ("step", 500, 6), ("log", 500, 9), ("log", 1, 6)],
)
def test_where_the_flag_is_read(tiny_model_dir, tmp_path, read, logging_steps, micro_batches):
    """After every micro-batch where the optimizer steps inside backward() (DeepSpeed), so a NaN in a
    middle micro-batch stops before the next one runs; before each optimizer step for an optimizer that
    cannot skip a step itself; at the next log (or the end) for a fused one, which skips it."""
    optim = "adamw_torch" if read == "step" else "adamw_torch_fused"
    args = quick_args(
        tmp_path, max_steps=3, gradient_accumulation_steps=3, optim=optim, logging_steps=logging_steps
    )
    trainer = CountingTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS * 6,
                              callbacks=[PoisonMicroBatch(2)])  # fmt: skip
    assert trainer._nonfinite_each_micro_batch is False  # no DeepSpeed here
    trainer._nonfinite_each_micro_batch = read == "micro_batch"
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train()
    # step 1: 3 micro-batches; step 2: the poisoned weight makes micro-batch 2 NaN
    assert trainer.micro_batches == micro_batches


@pytest.mark.parametrize(
    ("losses", "message"),
    [
        ([1.0, 2.0], None),
        ([1.0, float("inf"), float("nan")], "the training loss is inf at step 4"),
        ([float("nan")], "the training loss is nan at step 4"),
    ],
)
def test_the_flag_names_the_first_non_finite_loss_and_starts_over(tmp_path, losses, message):
    class OneProcess:
        num_processes = 1

    flag = NonFiniteFlag()
    for loss in losses:
        flag.add(torch.tensor(loss), 4)
    if message is None:
        flag.check(OneProcess(), 4, str(tmp_path))
    else:
        with pytest.raises(NonFiniteLossError, match=message):
            flag.check(OneProcess(), 4, str(tmp_path))
    flag.check(OneProcess(), 5, str(tmp_path))  # checked: nothing left over
