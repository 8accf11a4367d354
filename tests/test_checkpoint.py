"""Checkpoints and resume (sftrainer/checkpoint.py): exact resume after SIGKILL, atomic saves,
incomplete checkpoints skipped, the NaN guard, the run's record (resolved config + versions).

The resume tests run training in subprocesses (a helper script written to tmp_path) on a tiny Llama,
fp32 on the CPU, and compare weights and per-step losses with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import ROWS, quick_args, save_tiny_model
from transformers import TrainerCallback

from sftrainer import SFTTrainer
from sftrainer.checkpoint import (
    LAYOUT_FILE,
    batch_layout,
    check_resume_layout,
    checkpoint_problem,
    latest_checkpoint,
    resolve_checkpoint,
    resume_layout_problem,
)
from sftrainer.errors import ConfigError, NonFiniteLossError
from sftrainer.run import resolved_config, run_info
from sftrainer.run_config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]

# A training run that can kill itself: KILL_AT=<step> sends SIGKILL at the end of that optimizer
# step; KILL_IN_SAVE=<step> sends it while checkpoint <step> is being written (weights on disk,
# optimizer and RNG state not yet). Writes the final weights and every logged loss / grad norm.
SCRIPT = textwrap.dedent("""
    import json, logging, os, signal, sys
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback
    from sftrainer import SFTConfig, SFTTrainer, builtin

    model_dir, out_dir, packing, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    kill_at, kill_in_save = int(os.environ.get("KILL_AT", 0)), int(os.environ.get("KILL_IN_SAVE", 0))
    logging.basicConfig(level=logging.INFO)

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    save_rng = Trainer._save_rng_state
    def _save_rng_state(self, output_dir):
        if self.state.global_step == kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        save_rng(self, output_dir)
    Trainer._save_rng_state = _save_rng_state

    rows, _ = builtin.make_tasks(n_train=48, n_eval=0, seed=1)
    args = SFTConfig(
        output_dir=out_dir, max_length=64, packing=packing, per_device_train_batch_size=4,
        max_steps=14, learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=2,
        save_strategy="steps", save_steps=4, logging_steps=1, seed=0, report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model_dir, args=args, train_dataset=rows, callbacks=[Kill()])
    trainer.train(resume_from_checkpoint=True if resume else None)
    save_file({k: v.contiguous() for k, v in trainer.model.state_dict().items()}, f"{out_dir}/final.safetensors")
    history = [(e["step"], e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]
    with open(f"{out_dir}/history.json", "w") as f:
        json.dump(history, f)
""")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, sftrainer_home):
    from transformers import AutoTokenizer

    from sftrainer import builtin

    tokenizer = AutoTokenizer.from_pretrained(builtin.model_dir())
    return save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("tiny") / "llama")


def run(tmp_path: Path, model_dir: Path, out: Path, packing: bool, resume: bool = False, **env: int):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    environ = {**os.environ, **{k: str(v) for k, v in env.items()}}
    return subprocess.run(
        [
            sys.executable,
            str(script),
            str(model_dir),
            str(out),
            "1" if packing else "0",
            "1" if resume else "0",
        ],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


def finished(out: Path) -> tuple[dict[str, torch.Tensor], list]:
    return load_file(out / "final.safetensors"), json.loads((out / "history.json").read_text())


def assert_same_run(a: Path, b: Path) -> None:
    (weights_a, history_a), (weights_b, history_b) = finished(a), finished(b)
    assert [s for s, *_ in history_a] == list(range(1, 15)) == [s for s, *_ in history_b]
    for (step, loss_a, norm_a), (_, loss_b, norm_b) in zip(history_a, history_b):
        assert abs(loss_a - loss_b) <= 1e-6 and abs(norm_a - norm_b) <= 1e-6, f"step {step}"
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert (weights_a[name] - weights_b[name]).abs().max() <= 1e-6, name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, model_dir):
    """The reference runs, padded and packed, never interrupted (in this process: the same script)."""
    runs = {}
    for packing in (False, True):
        out = tmp_path_factory.mktemp("reference") / "out"
        script = out.parent / "run.py"
        script.write_text(SCRIPT)
        argv = sys.argv
        sys.argv = [str(script), str(model_dir), str(out), "1" if packing else "0", "0"]
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv = argv
        runs[packing] = out
    return runs


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, model_dir, uninterrupted, packing):
    """Killed at step 6 (checkpoint-4 is the latest), resumed: same weights and per-step losses."""
    out = tmp_path / "out"
    killed = run(tmp_path, model_dir, out, packing, KILL_AT=6)
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(out) == str(out / "checkpoint-4")
    resumed = run(tmp_path, model_dir, out, packing, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4" in resumed.stderr
    assert_same_run(out, uninterrupted[packing])


def test_sigkill_while_saving_leaves_the_previous_checkpoint_as_latest(tmp_path, model_dir, uninterrupted):
    """Killed while writing checkpoint-8: no checkpoint-8 appears; the resume from checkpoint-4 is exact."""
    out = tmp_path / "out"
    killed = run(tmp_path, model_dir, out, packing=False, KILL_IN_SAVE=8)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "tmp-checkpoint-8" / "checkpoint-8" / "model.safetensors").is_file()  # the save had begun
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    resumed = run(tmp_path, model_dir, out, packing=False, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Ignoring" in resumed.stderr and "tmp-checkpoint-8" in resumed.stderr
    assert not (out / "tmp-checkpoint-8").exists()  # removed when checkpoint-8 was saved again
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-14",
        "checkpoint-4",
        "checkpoint-8",
    ]
    assert_same_run(out, uninterrupted[False])


# ---- in-process: atomic save, rotation, best checkpoint, incomplete checkpoints, NaN guard ----


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint-", "tmp-")))


def test_save_total_limit_keeps_the_best_and_the_latest(tmp_path, tiny_model_dir):
    """Rotation (2: the best and the latest) and the best checkpoint work through the staged save;
    no staging directory is left."""
    out = tmp_path / "out"
    args = quick_args(out, max_steps=4, save_strategy="steps", save_steps=1, eval_strategy="steps",
                      eval_steps=1, save_total_limit=2, metric_for_best_model="eval_loss",
                      greater_is_better=True, load_best_model_at_end=True, learning_rate=1e-2)  # fmt: skip
    # greater_is_better on a falling loss: the best is the first checkpoint, not the last.
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS)
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-1")
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(out / "checkpoint-1") and state["global_step"] == 4
    assert checkpoint_problem(out / "checkpoint-1") is None
    best = load_file(out / "checkpoint-1" / "model.safetensors")  # load_best_model_at_end loaded it
    assert all(torch.equal(p.detach(), best[n]) for n, p in trainer.model.named_parameters() if n in best)


def test_save_by_epoch_and_over_an_existing_checkpoint(tmp_path, tiny_model_dir):
    """save_strategy=epoch names checkpoints by step; a run resumed from an older checkpoint replaces the
    later ones it saves again."""
    out = tmp_path / "out"
    args = quick_args(out, max_steps=-1, num_train_epochs=2, save_strategy="epoch")
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS).train()
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    (out / "checkpoint-4" / "stale").write_text("from the first run")
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS).train(str(out / "checkpoint-2"))
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "checkpoint-4" / "stale").exists() and checkpoint_problem(out / "checkpoint-4") is None


def fabricate_broken(out: Path, step: int) -> Path:
    """A checkpoint a crash of plain transformers' Trainer could leave: weights, no trainer state."""
    broken = out / f"checkpoint-{step}"
    broken.mkdir(parents=True)
    shutil.copy(out / "checkpoint-2" / "model.safetensors", broken / "model.safetensors")
    return broken


def test_resume_skips_an_incomplete_checkpoint(tmp_path, tiny_model_dir, caplog):
    out = tmp_path / "out"
    args = quick_args(out, max_steps=2, save_strategy="steps", save_steps=2, logging_steps=1)
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS).train()
    broken = fabricate_broken(out, 5)
    (out / "checkpoint-7").mkdir()  # an empty one, newer still
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"global_st')
    assert checkpoint_problem(broken) == "trainer_state.json is missing (the save was interrupted)"
    assert (
        checkpoint_problem(out / "checkpoint-7")
        == "trainer_state.json is unreadable (the save was interrupted)"
    )
    with caplog.at_level("INFO", logger="sftrainer"):
        assert resolve_checkpoint(True, str(out)) == str(out / "checkpoint-2")
    assert (
        f"Skipping incomplete checkpoint {out / 'checkpoint-7'}: trainer_state.json is unreadable"
        in caplog.text
    )
    assert f"Skipping incomplete checkpoint {broken}: trainer_state.json is missing" in caplog.text
    with pytest.raises(
        ConfigError, match=r"checkpoint-5 cannot be resumed from: trainer_state.json is missing"
    ):
        resolve_checkpoint(str(broken), str(out))
    # The Python API's resume_from_checkpoint=True skips it too (transformers' would pick checkpoint-7).
    args = quick_args(out, max_steps=3, save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS)
    trainer.train(resume_from_checkpoint=True)
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [1, 2, 3]


# ---- the process layout of a checkpoint ---------------------------------------------------


def layout_args(world: int, batch: int, accumulation: int = 1, allow: bool = False):
    from types import SimpleNamespace

    return SimpleNamespace(
        world_size=world,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        allow_batch_change_on_resume=allow,
        should_log=True,
    )


def test_a_checkpoint_records_its_process_layout(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = quick_args(out, max_steps=2, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2)
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS).train()
    recorded = json.loads((out / "checkpoint-2" / LAYOUT_FILE).read_text())
    assert recorded == {
        "world_size": 1,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "effective_batch_size": 4,
    }
    assert recorded == batch_layout(args)
    # The same layout resumes without a word; another effective batch is refused before training.
    check_resume_layout(str(out / "checkpoint-2"), args)
    other = quick_args(out, max_steps=3)  # batch 2, no accumulation: an effective batch of 2
    trainer = SFTTrainer(model=str(tiny_model_dir), args=other, train_dataset=ROWS)
    with pytest.raises(ConfigError, match=r"effective batch of 4 .* this run has 1 process\(es\) at 2 "):
        trainer.train(resume_from_checkpoint=True)


def test_an_older_checkpoint_without_a_layout_resumes_unchecked(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    check_resume_layout(str(tmp_path / "checkpoint-3"), layout_args(4, 1))  # no error


@pytest.mark.parametrize(
    ("then", "now", "error", "warning"),
    [
        ((2, 4, 1), (2, 4, 1), None, None),
        (
            (2, 4, 1),
            (1, 8, 1),
            None,
            "written by 2 process(es), this run has 1: the effective batch (8) is unchanged",
        ),
        ((2, 4, 1), (4, 1, 2), None, "this run has 4: the effective batch (8) is unchanged"),
        ((2, 4, 1), (1, 4, 1), "Set per_device_train_batch_size=8 to keep it", None),
        (
            (2, 4, 1),
            (3, 4, 1),
            "Choose per_device_train_batch_size x gradient_accumulation_steps = 8 / 3",
            None,
        ),
        ((1, 8, 1), (1, 8, 2), "at an effective batch of 8 (8 per process x 1 x accumulation 1)", None),
    ],
)
def test_resume_layout_problem(then, now, error, warning):
    recorded = batch_layout(layout_args(*then))
    got_error, got_warning = resume_layout_problem(recorded, layout_args(*now), "checkpoint-2")
    if error is None:
        assert got_error is None
    else:
        assert got_error.startswith("resume_from_checkpoint: checkpoint-2 was written by")
        assert error in got_error and "or set allow_batch_change_on_resume: true" in got_error
        # the override turns it into a warning that still says what changes
        allowed = layout_args(*now, allow=True)
        assert resume_layout_problem(recorded, allowed, "checkpoint-2")[0] is None
        assert "would train on other examples" in resume_layout_problem(recorded, allowed, "checkpoint-2")[1]
    assert (got_warning is None) == (warning is None)
    if warning:
        assert warning in got_warning


class PoisonAt(TrainerCallback):
    """Sets one weight to NaN at step ``step``: at its end (before it is saved), or after its save."""

    def __init__(self, step: int, event: str):
        self.step, self.event = step, event

    def poison(self, state, model):
        if state.global_step == self.step:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("nan")

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.event == "step_end":
            self.poison(state, model)

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.event == "save":
            self.poison(state, model)


@pytest.mark.parametrize("event", ["save", "step_end"])
def test_nan_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_model_dir, event
):
    """NaN weights after checkpoint-2 was saved: step 3's loss is NaN and stops training. NaN weights
    before it: the save of checkpoint-2 is refused. Either way every checkpoint on disk is finite."""
    out = tmp_path / "out"
    args = quick_args(out, max_steps=5, save_strategy="steps", save_steps=1)
    callbacks = [PoisonAt(2, event)]
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, callbacks=callbacks)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    if event == "save":
        assert str(info.value) == (
            f"the training loss is nan at step 3; training stopped before applying it, and the last checkpoint, "
            f"{out / 'checkpoint-2'}, is kept (resume_from_checkpoint: true continues from it). Lower "
            "learning_rate, set max_grad_norm, or check the data of that step"
        )
        assert checkpoints(out) == ["checkpoint-1", "checkpoint-2"]
    else:
        assert str(info.value) == (
            "the weights hold nan or inf after step 2 (first: model.embed_tokens.weight); training stopped "
            f"without saving them, and the last checkpoint, {out / 'checkpoint-1'}, is kept. Lower "
            "learning_rate or set max_grad_norm"
        )
        assert checkpoints(out) == ["checkpoint-1"]
    for name in checkpoints(out):
        weights = load_file(out / name / "model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values()), name


def test_nan_weights_after_the_last_step_are_refused(tmp_path, tiny_model_dir):
    """The last update overflowed and nothing was saved: train() raises, so train.py saves no model."""
    args = quick_args(tmp_path / "out", max_steps=3)
    trainer = SFTTrainer(
        model=str(tiny_model_dir), args=args, train_dataset=ROWS, callbacks=[PoisonAt(3, "step_end")]
    )
    with pytest.raises(NonFiniteLossError, match=r"after step 3 .* no checkpoint was written before it"):
        trainer.train()


# ---- the run's record ------------------------------------------------------------------------


def test_resolved_config_round_trips(tmp_path):
    """Every key written, defaults filled in; it loads back to the same config."""
    from sftrainer.coerce import init_fields
    from sftrainer.config import SFTConfig

    cfg = load_config(REPO / "configs" / "builtin-lora.yaml", ["lora.r=4", "max_steps=5"])
    resolved = resolved_config(cfg)
    skipped = {"hub_token", "resume_from_checkpoint", "overwrite_output_dir"}
    assert set(resolved) == (set(init_fields(SFTConfig)) - skipped) | {"model", "data", "lora"}
    assert resolved["lora"]["r"] == 4 and resolved["model"]["dtype"] == "auto"  # a section default
    assert resolved["truncation_mode"] == "keep_start" and resolved["lr_scheduler_type"] == "cosine"
    assert resolved["bf16"] is False  # resolved for this machine (unset = where the device supports it)
    path = tmp_path / "saved.yaml"
    path.write_text(yaml.safe_dump(resolved, sort_keys=False))
    again = load_config(path)
    assert again.lora == cfg.lora and again.data == cfg.data and again.model == cfg.model
    assert again.train.to_dict() == cfg.train.to_dict()


def test_run_info_names_the_versions_and_the_command():
    info = run_info(["sftrainer", "train", "x.yaml"])
    assert info["command"] == ["sftrainer", "train", "x.yaml"]
    for name in ("python", "torch", "transformers", "peft", "datasets", "accelerate", "sftrainer"):
        assert info["versions"][name], name
