"""The trainer's argument steps (sftrainer/trainer_args.py) that only a GPU machine would exercise, decided
on the CPU: the decision is tested, not the copy engine."""

from __future__ import annotations

import pytest

from sftrainer import SFTConfig
from sftrainer.trainer_args import device_transfers, trainer_args


@pytest.mark.parametrize(
    ("cuda", "pin_memory", "non_blocking"),
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
)
def test_pinned_batches_are_copied_without_blocking_where_cuda_is(tmp_path, cuda, pin_memory, non_blocking):
    caller = SFTConfig(output_dir=str(tmp_path), report_to="none")
    caller.dataloader_pin_memory = pin_memory  # SFTConfig turns it off on a machine without a GPU
    args = trainer_args("model", caller)
    device_transfers(args, cuda)
    assert args.accelerator_config.non_blocking is non_blocking
    assert caller.accelerator_config.non_blocking is False  # the caller's config is never written to
    assert args.dataloader_pin_memory is pin_memory


def test_a_caller_who_set_non_blocking_keeps_it(tmp_path):
    caller = SFTConfig(output_dir=str(tmp_path), report_to="none", accelerator_config={"non_blocking": True})
    args = trainer_args("model", caller)
    device_transfers(args, cuda=False)
    assert args.accelerator_config.non_blocking is True
