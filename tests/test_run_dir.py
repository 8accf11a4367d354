"""A used output_dir (sftrainer.run_dir): what counts as an earlier run, what a new run from step 0 does
about it (the Python API sets its records apart; ``sftrainer train`` refuses: tests/test_cli.py),
overwrite_output_dir, resuming, and the hint printed after an interruption."""

from __future__ import annotations

import json

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.errors import ConfigError
from sftrainer.run_dir import clear_earlier_run, earlier_run, resume_hint

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fake_checkpoint(out, step: int) -> None:
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (path / "model.safetensors").write_bytes(b"")


def test_what_counts_as_an_earlier_run(tmp_path):
    assert not earlier_run(tmp_path / "missing") and not earlier_run(tmp_path)
    (tmp_path / "train.jsonl").write_text("{}\n")  # the user's files
    (tmp_path / "notes").mkdir()
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_before_loss": 2.0}) + "\n")
    assert not earlier_run(tmp_path)  # an evaluation only: no training to mix with
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 1.5}) + "\n" + '{"step": 10, "lo')  # cut by a crash
    assert earlier_run(tmp_path).describe() == "metrics.jsonl logging training up to step 5"
    for step in (10, 2):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "tmp-checkpoint-12").mkdir()
    assert earlier_run(tmp_path).checkpoints == ("checkpoint-2", "checkpoint-10", "tmp-checkpoint-12")
    assert sorted(clear_earlier_run(tmp_path)) == [
        "checkpoint-10", "checkpoint-2", "metrics.jsonl", "tmp-checkpoint-12"
    ]  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "train.jsonl"]


def trainer(model_dir, out, **kw) -> SFTTrainer:
    settings = dict(save_strategy="steps", save_steps=2, logging_steps=1, eval_strategy="steps", eval_steps=2)
    args = quick_args(out, **{**settings, **kw})
    return SFTTrainer(model=str(model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2])


@pytest.mark.slow
def test_a_new_run_into_a_used_output_dir_is_set_apart_overwritten_or_resumed(
    tiny_model_dir, tmp_path, caplog
):
    out = tmp_path / "run"
    trainer(tiny_model_dir, out, max_steps=4).train()
    before = (out / "metrics.jsonl").read_text()

    # Trained from step 0 again through the Python API: it trains, as TRL's and transformers' trainers do
    # (the seed example trains twice into one directory), with the earlier run's records set apart.
    with caplog.at_level("WARNING", logger="sftrainer"):
        trainer(tiny_model_dir, out, max_steps=2).train()
    assert (out / "earlier-runs" / "1" / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]  # this run's alone
    assert (
        f"output_dir {out} already holds a training run (checkpoint-2, checkpoint-4; metrics.jsonl logging "
        "training up to step 4): this run starts from step 0 beside it" in caplog.text
    )
    assert f"moved to {out / 'earlier-runs' / '1'}" in caplog.text
    caplog.clear()

    # overwrite_output_dir: the earlier run's checkpoints and records go; this run's evaluation before
    # training (logged before train() is called) stays.
    second = trainer(tiny_model_dir, out, max_steps=2, overwrite_output_dir=True)
    with caplog.at_level("WARNING", logger="sftrainer"):
        second.evaluate(metric_key_prefix="eval_before")
    assert (
        f"overwrite_output_dir: removed the earlier run's checkpoint-2, checkpoint-4, metrics.jsonl from {out}"
        in caplog.text
    )
    second.train()
    steps = [r["step"] for r in records(out)]
    assert steps == [0, 1, 2, 2, 2]  # eval_before, the losses, the eval and the summary at step 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(ConfigError, match="overwrite_output_dir: true removes the checkpoints"):
        second.train(resume_from_checkpoint=True)

    # Resumed: the same run goes on, and so does its metrics.jsonl.
    trainer(tiny_model_dir, out, max_steps=4).train(resume_from_checkpoint=True)
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2, 3, 4]
    steps = [r["step"] for r in records(out)]
    assert steps == sorted(steps)


def test_resume_hint_names_the_last_checkpoint_and_the_command(tmp_path):
    out = tmp_path / "my run"
    command = ["sftrainer", "train", "my.yaml", f"output_dir={out}", "resume_from_checkpoint=false"]
    assert resume_hint(out, command) == (
        f"No checkpoint was saved in {out} yet: running the command again starts over."
    )
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert resume_hint(out, command) == (
        f"No checkpoint was saved in {out} yet. To start over there:\n"
        f"  sftrainer train my.yaml 'output_dir={out}' overwrite_output_dir=true"
    )
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4)
    (out / "checkpoint-6").mkdir()  # a save cut short: not resumable
    hint = resume_hint(out, [*command, "overwrite_output_dir=true"], overwrite=True)
    assert hint == (
        f"The last complete checkpoint is {out / 'checkpoint-4'}. To resume from it:\n"
        f"  sftrainer train my.yaml 'output_dir={out}' resume_from_checkpoint=true overwrite_output_dir=false"
    )
    assert resume_hint(out, None).endswith(
        "To resume from it:\n  the same command with resume_from_checkpoint=true"
    )
