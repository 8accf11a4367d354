"""Checkpoints and resume (sftrainer/checkpoint.py): exact resume after SIGKILL, atomic saves,
incomplete checkpoints skipped, the NaN guard, the run's record (resolved config + versions).

The resume tests run training in subprocesses (a helper script written to tmp_path) on a tiny Llama,
fp32 on the CPU, and compare weights and per-step losses with an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model

from sftrainer.checkpoint import latest_checkpoint

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
