"""Pre-flight (sftrainer/preflight.py): the step count against what Trainer runs, each warning on crafted data (and none on clean data), the probe, and the block ``sftrainer train`` logs."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
from tiny_models import quick_args

from sftrainer import SFTTrainer
from sftrainer.constants import FULL_LR_RANGE, IGNORE_INDEX, LORA_LR_RANGE
from sftrainer.data.load import load
from sftrainer.data.stats import row_arrays
from sftrainer.preflight import (
    StepTimeCallback,
    check_run,
    for_trainer,
    plan_from_args,
    plan_steps,
    rows_missing_stop,
)
from sftrainer.preview import prepare_for_preview

pytestmark = pytest.mark.slow

PAIRS = [{"prompt": f"Count the words: {'sun ' * n}", "response": str(n)} for n in range(1, 12)]


# ---- steps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        dict(max_steps=-1, num_train_epochs=2, per_device_train_batch_size=3, gradient_accumulation_steps=2),
        dict(max_steps=-1, num_train_epochs=1.5, per_device_train_batch_size=4),
        dict(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2, packing=True, max_length=48),
        dict(max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4, dataloader_drop_last=True),
        dict(max_steps=5, per_device_train_batch_size=2),
    ],
    ids=["epochs+accumulation", "fractional-epochs", "packing", "drop-last", "max-steps"],
)
def test_step_count_is_what_trainer_runs(tmp_path, tiny_model, tokenizer, overrides):
    args = quick_args(tmp_path, learning_rate=1e-4, **overrides)
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=PAIRS, processing_class=tokenizer)
    plan = plan_from_args(len(trainer.train_dataset), trainer.args)
    trainer.train()
    assert trainer.state.max_steps == plan.total_steps
    assert trainer.state.global_step == plan.total_steps
    # sftrainer data counts the same sequences without a trainer (packing included)
    _, stats, pack = prepare_for_preview(load(PAIRS), tokenizer, trainer.args)
    assert (pack.sequences if pack else stats.kept) == len(trainer.train_dataset)


def test_plan_steps_arithmetic():
    plan = plan_steps(100, 8, grad_accum=4, epochs=3)  # 13 batches -> 4 steps per epoch
    assert (plan.steps_per_epoch, plan.total_steps, plan.per_step) == (4, 12, 32)
    assert plan_steps(100, 8, grad_accum=4, drop_last=True).steps_per_epoch == 3  # 12 batches
    assert plan_steps(100, 8, devices=2).steps_per_epoch == 7
    assert plan_steps(3, 8).steps_per_epoch == 1
    assert math.isclose(plan_steps(100, 10, max_steps=25).epochs, 2.5)


# ---- warnings ----------------------------------------------------------------------------------

CLEAN = dict(rows=10, truncated=0, missing_stop=0, duplicates=0, eval_rows=5, learning_rate=2e-4, lora=True)


def test_no_warning_on_a_clean_run():
    assert check_run(**CLEAN) == []
    assert check_run(**{**CLEAN, "lora": False, "learning_rate": 2e-5}) == []
    assert check_run(**{**CLEAN, "eval_rows": None}) == []  # no eval data configured: nothing to warn about
    assert check_run(**{**CLEAN, "truncated": 5}) == []  # half is not most


@pytest.mark.parametrize(
    "change, text",
    [
        ({"missing_stop": 3}, "3 of 10 rows train no end token"),
        ({"truncated": 6}, "6 of 10 rows (60%) are cut to max_length"),
        ({"eval_rows": 0}, "the eval split is empty"),
        ({"dropped": 4}, "4 of 10 rows are dropped"),
        ({"duplicates": 2}, "2 rows repeat an earlier row"),
        ({"learning_rate": LORA_LR_RANGE[1] * 2}, "outside the usual range for LoRA"),
        ({"learning_rate": LORA_LR_RANGE[0] / 2}, "outside the usual range for LoRA"),
        (
            {"learning_rate": FULL_LR_RANGE[1] * 2, "lora": False},
            "outside the usual range for full fine-tuning",
        ),
    ],
)
def test_each_warning_fires(change, text):
    found = check_run(**{**CLEAN, **change})
    assert len(found) == 1 and text in found[0], found


def test_missing_end_token_is_found_in_prepared_rows(tmp_path, tokenizer):
    """Pre-tokenized rows that never train EOS are counted; chat rows (which train <|im_end|>) are not;
    a row cut at max_length lost its EOS to truncation and is not counted as missing it."""
    eos = tokenizer.eos_token_id
    args = quick_args(tmp_path, max_length=8)
    rows = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},  # no EOS trained
        {"input_ids": [5, 6, eos], "labels": [IGNORE_INDEX, 6, eos]},
        {
            "input_ids": [5, 6, 7, eos],
            "labels": [IGNORE_INDEX, 6, 7, IGNORE_INDEX],
        },  # EOS present, not trained
        {"input_ids": list(range(5, 17)), "labels": list(range(5, 17))},  # truncated to 8
    ]
    prepared, stats, _ = prepare_for_preview(load(rows), tokenizer, args)
    assert stats.truncated == 1
    assert rows_missing_stop(row_arrays(prepared), [eos], args.max_length) == 2
    chat, _, _ = prepare_for_preview(load(PAIRS), tokenizer, quick_args(tmp_path, max_length=64))
    assert rows_missing_stop(row_arrays(chat), [eos], 64) == 0


def test_warnings_from_crafted_files_through_the_command(tmp_path, capsys, tiny_model_dir):
    """Duplicates, most rows truncated and a learning rate far too high for full fine-tuning, on one
    file with a real (non-builtin) model directory; then a clean file with none of them."""
    from sftrainer.cli import main

    model_dir = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model_dir, model_dir)
    long = [{"prompt": "Say sun 20 times", "response": "sun " * 20}] * 3
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in long + PAIRS[:2]))
    assert (
        main(
            [
                "data",
                str(bad),
                "--model",
                str(model_dir),
                "--rows",
                "0",
                "max_length=24",
                "learning_rate=1e-3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("  warning:")]
    assert len(warnings) == 3, out
    assert "2 rows repeat an earlier row" in out and "3 of 5 rows (60%) are cut" in out
    assert "learning_rate=0.001 is outside the usual range for full fine-tuning" in out

    clean = tmp_path / "clean.jsonl"
    clean.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    assert main(["data", str(clean), "--model", str(model_dir), "--rows", "0", "learning_rate=2e-5"]) == 0
    assert "  warnings: none" in capsys.readouterr().out


def test_empty_eval_split_is_reported_not_fatal(tmp_path, capsys, tiny_model_dir):
    """Eval rows that all lose their trained tokens leave an empty eval split: a warning in the preview."""
    from sftrainer.cli import main

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text(json.dumps({"input_ids": [5, 6], "labels": [IGNORE_INDEX, IGNORE_INDEX]}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name_or_path: builtin\ndata:\n  train: {train}\n  eval: {evaluation}\n")
    assert main(["data", str(config), "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning: the eval split is empty" in out


# ---- time --------------------------------------------------------------------------------------


def test_probe_times_real_training_steps(tmp_path, capsys, tiny_model_dir):
    from sftrainer.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    assert (
        main(
            [
                "data",
                str(data),
                "--model",
                "builtin",
                "--rows",
                "0",
                "--probe",
                "per_device_train_batch_size=2",
                f"data.eval={data}",
                "eval_strategy=steps",
                "eval_steps=2",
                "max_steps=6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("  time ("))
    assert "measured" in line and "s per optimizer step (over 3 steps)" in line and "per epoch" in line
    seconds = float(line.split("measured ")[1].split(" s per")[0])
    assert seconds > 0 and math.isfinite(seconds)
    # Evaluations: the one before training, at steps 2, 4 and 6 (none after: train.py reuses step 6's).
    assert "for 6 steps + 4 evaluations x " in line and "(11 eval rows at the probe's " in line, line


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(timer, fake, *, first=0, max_steps=30, step_seconds=5.0, evals=(10, 20, 30), before=36.0):
    """Trainer's events for ``timer``: an evaluation before training, then steps with the
    evaluations of eval_strategy=steps, eval_steps=10 (17 s each) after them."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        eval_strategy="steps", eval_steps=10, logging_steps=5, eval_delay=0, eval_on_start=False
    )
    state = SimpleNamespace(global_step=first, max_steps=max_steps, is_world_process_zero=True)
    if before:
        fake.now += before
        timer.on_log(args, state, None, logs={"eval_before_loss": 2.0, "eval_before_runtime": before})
    timer.on_train_begin(args, state, None)
    for step in range(first + 1, max_steps + 1):
        fake.now += step_seconds
        state.global_step = step
        timer.on_step_end(args, state, None)
        if step in evals:
            fake.now += 17.0
            timer.on_log(args, state, None, logs={"eval_loss": 1.0, "eval_runtime": 17.0})


def test_the_estimate_counts_the_evaluations(caplog):
    """The user's run: 30 steps, evaluations at 10, 20, 30 and none after (train.py reuses step 30's);
    the one before training times them. Evaluations inside the timed steps are not step time."""
    fake = FakeClock()
    timer = StepTimeCallback(3, steps_per_epoch=30, total=30, clock=fake)
    with caplog.at_level(logging.INFO, logger="sftrainer.preflight"):
        _drive(timer, fake)
    assert timer.seconds_per_step == 5.0
    assert timer.estimate.total == 30 * 5.0 + 3 * 36.0
    assert (
        "2m30s for 30 steps + 3 evaluations x 36s (as the evaluation before training) = 4m18s" in caplog.text
    )
    fake = FakeClock()
    timer = StepTimeCallback(3, steps_per_epoch=30, total=30, clock=fake)
    _drive(timer, fake, evals=(2, 10, 20, 30))  # one inside the timed steps
    assert timer.seconds_per_step == 5.0 and timer.estimate.evaluations == 3  # as eval_strategy says
    fake = FakeClock()
    timer = StepTimeCallback(3, steps_per_epoch=30, total=30, final_evaluation=True, clock=fake)
    _drive(timer, fake, evals=(), before=0.0)  # eval_strategy=no: one evaluation after training
    assert timer.estimate.total is None  # not timed: no evaluation ran before the estimate
    assert timer.estimate.describe() == "2m30s for 30 steps + 4 evaluations (not timed yet)"


def test_a_resumed_runs_estimate_covers_the_steps_left(caplog):
    fake = FakeClock()
    timer = StepTimeCallback(3, steps_per_epoch=30, total=30, clock=fake)
    with caplog.at_level(logging.INFO, logger="sftrainer.preflight"):
        _drive(timer, fake, first=20)
    assert timer.estimate.steps == 10 and timer.estimate.evaluations == 1  # step 30's; step 20's ran before
    assert "50s for the 10 steps left (resumed at step 20 of 30) + 1 evaluation x 36s" in caplog.text


def test_step_timer_measures_after_a_warm_up_step():
    class State:
        global_step = 0
        is_world_process_zero = True

    timer = StepTimeCallback(steps=2)
    state = State()
    for step in range(1, 5):
        state.global_step = step
        timer.on_step_end(None, state, None)
        assert (timer.seconds_per_step is None) == (step < 3)
    assert timer.seconds_per_step >= 0


# ---- at train start ----------------------------------------------------------------------------


def test_train_logs_the_preflight_and_the_measured_time(tmp_path, caplog, tiny_model_dir):
    from sftrainer.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 2))
    with caplog.at_level(logging.INFO, logger="sftrainer"):
        code = main(["train", f"data.train={data}", "data.eval=null", f"output_dir={tmp_path / 'run'}",
                     "max_steps=5", "per_device_train_batch_size=2", "exact_match_samples=0",
                     "save_strategy=no", "disable_tqdm=true"])  # fmt: skip
    assert code == 0
    text = caplog.text
    assert "Pre-flight:" in text and "optimizer steps: 5 (11 per epoch" in text
    assert "optimizer: adamw_torch_fused (transformers' default: torch's fused AdamW" in text
    assert "time: measured on the first 4 optimizer steps and the evaluation before training" in text
    assert "Pre-flight: measured" in text and "per epoch, " in text and "for 5 steps" in text


def test_resumed_train_says_the_steps_left(tmp_path, caplog, tiny_model_dir):
    from sftrainer.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 2))
    common = [f"data.train={data}", "data.eval=null", f"output_dir={tmp_path / 'run'}",
              "per_device_train_batch_size=2", "exact_match_samples=0", "save_strategy=steps", "save_steps=3",
              "disable_tqdm=true"]  # fmt: skip
    assert main(["train", *common, "max_steps=3"]) == 0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sftrainer"):
        assert main(["train", *common, "max_steps=8", "resume_from_checkpoint=true"]) == 0
    text = caplog.text
    assert "optimizer steps: 8 (11 per epoch" in text and "resuming at step 3: 5 left" in text
    assert "for the 5 steps left (resumed at step 3 of 8)" in text
    assert "for 8 steps" not in text


def test_the_estimate_holds_against_a_timed_run_with_evaluations(tmp_path, monkeypatch, tiny_model_dir):
    """End to end: the logged estimate against the training loop's measured time (train_runtime), on a
    run whose evaluations (88 rows, 4 of them) take most of its time, so that leaving them out misses
    by more than the factor. The clocks are this process's CPU time on one thread (Trainer's
    ``time.time`` and the step timer's): on a shared machine, wall time measures the other processes'
    load, which changes during a run (wall-clock ratios on the loaded 2-core CPU: 0.33 to 0.85), while
    one thread's CPU time measures the work. The factor, 3, is generous on purpose: the estimate
    extrapolates 3 timed steps and 1 timed evaluation; measured on the 2-core CPU at load 6, CPU time:
    estimate / measured 0.98, 0.97, 1.08 (the steps alone: 0.11 to 0.12). The arithmetic itself is
    checked exactly on a fake clock above."""
    import time

    import torch

    from sftrainer import preflight
    from sftrainer.cli import main

    timers = []
    init = preflight.StepTimeCallback.__init__

    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs, clock=time.process_time)
        timers.append(self)

    monkeypatch.setattr(preflight.StepTimeCallback, "__init__", recorded)
    wall = time.time()
    monkeypatch.setattr(time, "time", lambda: wall + time.process_time())  # Trainer's runtimes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # idle OpenMP threads spin, and their CPU time would grow with the load
    data, evaluation = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 2))
    evaluation.write_text("".join(json.dumps(r) + "\n" for r in PAIRS * 8))
    run = tmp_path / "run"
    try:
        code = main(["train", f"data.train={data}", f"data.eval={evaluation}", f"output_dir={run}",
                     "max_steps=8", "eval_strategy=steps", "eval_steps=2", "per_device_train_batch_size=2",
                     "per_device_eval_batch_size=2", "exact_match_samples=0", "save_strategy=no",
                     "disable_tqdm=true"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    (timer,) = timers
    estimate = timer.estimate
    assert estimate.evaluations == 4 and estimate.seconds_per_evaluation > 0
    measured = json.loads((run / "all_results.json").read_text())["train_runtime"]  # steps + evaluations
    steps_only = estimate.seconds_per_step * estimate.steps
    assert steps_only < measured / 3  # without the evaluations, the estimate would miss
    assert measured / 3 <= estimate.total <= measured * 3, (estimate, measured)


def test_for_trainer_matches_the_trainer(tmp_path, tiny_model, tokenizer):
    args = quick_args(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=4)
    trainer = SFTTrainer(model=tiny_model, args=args, train_dataset=PAIRS, processing_class=tokenizer)
    report, why = for_trainer(trainer, load(PAIRS), lora=False)
    assert why == "" and report.plan.total_steps == 3 and report.plan.sequences == len(PAIRS)
    labels = np.concatenate([np.asarray(r["labels"]) for r in trainer.train_dataset])
    assert report.trained_tokens == int((labels != IGNORE_INDEX).sum())
    assert report.memory is not None and report.memory.total > 0
