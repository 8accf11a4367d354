"""Run time (sftrainer/timing.py): the steps Trainer evaluates at, and the clock's arithmetic (time per
step with evaluations taken out, tokens per second over one window, the time left), on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sftrainer.timing import (
    RunClock,
    TimeEstimate,
    eval_seconds,
    evaluation_steps,
    evaluations_left,
)


def _args(**overrides):
    values = dict(eval_strategy="steps", eval_steps=10, logging_steps=5, eval_delay=0, eval_on_start=False)
    return SimpleNamespace(**{**values, **overrides})


@pytest.mark.parametrize(
    "overrides, max_steps, per_epoch, expected",
    [
        ({}, 30, None, [10, 20, 30]),
        ({}, 25, None, [10, 20, 25]),  # and the last step
        ({"eval_steps": 0.5}, 30, None, [15, 30]),  # a fraction of max_steps
        ({"eval_steps": None}, 12, None, [5, 10, 12]),  # logging_steps, as TrainingArguments sets it
        ({"eval_delay": 15}, 30, None, [20, 30]),
        ({"eval_on_start": True}, 20, None, [0, 10, 20]),
        ({"eval_strategy": "epoch"}, 30, 12, [12, 24, 30]),  # each epoch's end, the last one partial
        ({"eval_strategy": "epoch"}, 24, 12, [12, 24]),
        ({"eval_strategy": "epoch", "eval_delay": 2}, 30, 12, [24, 30]),
        ({"eval_strategy": "no"}, 30, None, []),
    ],
)
def test_evaluation_steps_are_trainers(overrides, max_steps, per_epoch, expected):
    assert evaluation_steps(_args(**overrides), max_steps, per_epoch) == expected


@pytest.mark.slow
def test_evaluation_steps_match_a_real_run(tmp_path, tiny_model_dir):
    from tiny_models import ROWS, quick_args

    from sftrainer import SFTTrainer

    args = quick_args(
        tmp_path, max_steps=5, eval_strategy="steps", eval_steps=2, per_device_train_batch_size=1
    )
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS[:1])
    trainer.train()
    ran = [e["step"] for e in trainer.state.log_history if "eval_loss" in e]
    assert ran == evaluation_steps(trainer.args, 5) == [2, 4, 5]


def test_evaluations_left_counts_the_one_at_this_step_until_it_ran():
    steps = [10, 20, 30]
    assert evaluations_left(steps, 5, None) == 3
    assert evaluations_left(steps, 10, None) == 3  # logged before its evaluation
    assert evaluations_left(steps, 10, 10) == 2
    assert evaluations_left(steps, 30, 30) == 0


def test_eval_seconds_of_any_prefix():
    assert eval_seconds({"eval_loss": 1.0, "eval_runtime": 17.0}) == 17.0
    assert eval_seconds({"eval_before_loss": 1.0, "eval_before_runtime": 36.0}) == 36.0
    assert eval_seconds({"loss": 1.0, "train_runtime": 5.0}) is None


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_clock_takes_evaluations_out_of_training_time():
    """The user's run: 5.3 s per step, an evaluation of 36 s before training and of 17 s at steps 10,
    20, 30. Time per step, the ETA and tokens per second come out exact."""
    fake = FakeClock()
    clock = RunClock(fake)
    clock.stop()
    fake.now += 36.0
    clock.evaluated(0, 36.0)  # before train(): timed, not training time
    clock.start(0)
    steps = evaluation_steps(_args(), 30)
    for step in range(1, 31):
        fake.now += 5.3
        if step % 4 == 0:  # a log; evaluations fall between logs at 10, 20 (and with one at 30)
            assert clock.tokens_per_second(1000.0 * step) == pytest.approx(1000 / 5.3)
            left = evaluations_left(steps, step, clock.evaluated_at)
            # Until the first evaluation in training, the one before training times the evaluations left.
            per_eval = 36.0 if step < 10 else 17.0
            assert clock.eta(step, 30, left) == pytest.approx((30 - step) * 5.3 + left * per_eval)
        if step in steps:
            fake.now += 17.0
            clock.evaluated(step, 17.0)
    assert clock.train_seconds == pytest.approx(30 * 5.3)
    assert clock.tokens_per_second_overall() == pytest.approx(1000 / 5.3)


def test_the_eval_sets_of_one_evaluation_add_up():
    clock = RunClock(FakeClock())
    clock.evaluated(10, 3.0)  # eval_a
    clock.evaluated(10, 4.0)  # eval_b, same step
    assert clock.seconds_per_evaluation == 7.0 and clock.evaluated_at == 10
    clock.evaluated(20, 5.0)
    assert clock.seconds_per_evaluation == 5.0


def test_a_resumed_call_counts_its_own_tokens_and_steps():
    fake = FakeClock()
    clock = RunClock(fake)
    clock.start(20, tokens=20_000.0)  # resumed at step 20 with 20k tokens trained before
    fake.now += 4 * 5.3
    assert clock.tokens_per_second(24_000.0) == pytest.approx(1000 / 5.3)
    assert clock.eta(24, 30) == pytest.approx(6 * 5.3)
    assert clock.tokens_per_second_overall() == pytest.approx(1000 / 5.3)


def test_time_estimate_text():
    plain = TimeEstimate(5.3, 30)
    assert plain.describe() == "2m39s for 30 steps" and plain.total == pytest.approx(159)
    with_evals = TimeEstimate(5.3, 30, 3, 36.0, "measured: the evaluation before training")
    assert with_evals.total == pytest.approx(159 + 108)
    assert with_evals.describe() == (
        "2m39s for 30 steps + 3 evaluations x 36s (measured: the evaluation before training) = 4m27s"
    )
    untimed = TimeEstimate(5.3, 30, 3)
    assert (
        untimed.total is None and untimed.describe() == "2m39s for 30 steps + 3 evaluations (not timed yet)"
    )
