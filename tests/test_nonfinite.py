"""The NaN / inf guard (sftrainer/nonfinite.py): a non-finite loss stops training before the optimizer
applies it, without a host-device sync per micro-batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ROWS, quick_args, trainable_snapshot
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import TrainerCallback

from sftrainer import SFTTrainer
from sftrainer.errors import NonFiniteLossError
from sftrainer.nonfinite import NonFiniteFlag


class CountSyncs(TorchDispatchMode):
    """Counts ``aten::_local_scalar_dense``: a tensor read on the host (``.item()``, ``bool(t)``), except
    while ``paused``."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self.paused:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


class SyncCountingTrainer(SFTTrainer):
    """Counts the syncs of each ``training_step`` outside the model's forward: transformers' mask code
    reads the attention mask on the host there (masking_utils' causal-skip check), which is not ours."""

    syncs_per_step: list[int]

    def training_step(self, model, inputs, num_items_in_batch=None):
        with CountSyncs() as counter:
            pause = model.register_forward_pre_hook(lambda *_: setattr(counter, "paused", True))
            resume = model.register_forward_hook(lambda *_: setattr(counter, "paused", False))
            try:
                loss = super().training_step(model, inputs, num_items_in_batch)
            finally:
                pause.remove()
                resume.remove()
        self.syncs_per_step.append(counter.syncs)
        return loss


def test_training_step_reads_nothing_back_from_the_device(tiny_model_dir, tmp_path):
    """No ``.item()`` per micro-batch on steps that do not log: the NaN flag stays on the device. (The
    first micro-batch also checks the chunked loss against the full one, once: ``loss.verify_chunked``.)"""
    args = quick_args(tmp_path, max_steps=3, gradient_accumulation_steps=2, logging_steps=100)
    trainer = SyncCountingTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS)
    trainer.syncs_per_step = []
    trainer.train()
    assert len(trainer.syncs_per_step) == 6
    assert trainer.syncs_per_step[1:] == [0] * 5


class PoisonMicroBatch(TrainerCallback):
    """Sets one weight to NaN after the first micro-batch of optimizer step ``step`` (1-based)."""

    def __init__(self, step: int):
        self.step, self.seen, self.before = step, 0, None

    def on_substep_end(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            self.before = trainable_snapshot(model)
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")


def test_a_nan_in_a_later_micro_batch_stops_before_the_optimizer_step(tiny_model_dir, tmp_path):
    args = quick_args(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    poison = PoisonMicroBatch(2)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, callbacks=[poison])
    with pytest.raises(NonFiniteLossError, match=r"^the training loss is nan at step 2; training stopped"):
        trainer.train()
    # the optimizer did not step: every weight but the poisoned one is as it was after step 1
    after = trainable_snapshot(trainer.model)
    assert trainer.state.global_step == 1
    poisoned = next(iter(poison.before))
    assert all(torch.equal(after[n], w) for n, w in poison.before.items() if n != poisoned)


class CountingTrainer(SFTTrainer):
    micro_batches = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.micro_batches += 1
        return super().training_step(model, inputs, num_items_in_batch)


@pytest.mark.parametrize("each_micro_batch", [False, True])
def test_where_the_flag_is_read(tiny_model_dir, tmp_path, each_micro_batch):
    """Once per optimizer step; after every micro-batch where the optimizer steps inside backward()
    (DeepSpeed), so a NaN in a middle micro-batch stops before the next one runs."""
    args = quick_args(tmp_path, max_steps=3, gradient_accumulation_steps=3)
    trainer = CountingTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS * 6,
                              callbacks=[PoisonMicroBatch(2)])  # fmt: skip
    assert trainer._nonfinite_each_micro_batch is False  # no DeepSpeed here
    trainer._nonfinite_each_micro_batch = each_micro_batch
    with pytest.raises(NonFiniteLossError, match="at step 2"):
        trainer.train()
    # step 1: 3 micro-batches; step 2: the poisoned weight makes micro-batch 2 NaN
    assert trainer.micro_batches == (5 if each_micro_batch else 6)


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
        flag.add(torch.tensor(loss))
    if message is None:
        flag.check(OneProcess(), 4, str(tmp_path))
    else:
        with pytest.raises(NonFiniteLossError, match=message):
            flag.check(OneProcess(), 4, str(tmp_path))
    flag.check(OneProcess(), 5, str(tmp_path))  # checked: nothing left over
