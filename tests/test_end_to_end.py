"""One run through the real CLI, as a user lives it: train a LoRA adapter with evaluation and
checkpoints, kill the process (SIGKILL) mid-run, resume, then report, merge and generate.

Each step has its own focused tests elsewhere; this one checks that they fit together.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

ROWS = [
    {"prompt": "Reverse the words: cat dog", "response": "dog cat"},
    {"prompt": "Count the words: sun sun sun", "response": "3"},
]


def cli(*argv: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-m", "sftrainer", *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, **kwargs
    )  # fmt: skip


# Hang guards, not speed checks. Measured on 2 shared CPU cores: the resume phase took 71 s (the
# whole test 147 s) and, with a busy loop beside it, the whole test 333 s; the guards were 240 s
# per phase and 180 s to the first checkpoint, too close for a loaded CI machine.
HANG_GUARD = 900


def finish(proc: subprocess.Popen, timeout: float = HANG_GUARD) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_train_kill_resume_report_merge_generate(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 16))
    run = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  train: {data}\n  eval: {data}\nlora:\n  r: 8\n  alpha: 16\n  dropout: 0.0\n"
        f"output_dir: {run}\nmax_steps: 60\nsave_strategy: steps\nsave_steps: 4\neval_strategy: steps\n"
        "eval_steps: 20\nlogging_steps: 4\nper_device_train_batch_size: 8\nlearning_rate: 1.0e-2\n"
        "exact_match_samples: 2\ndisable_tqdm: true\n"
    )
    # 1. Train, and kill the process once a checkpoint exists, as a crash or a preemption would.
    proc = cli("train", str(config))
    deadline = time.monotonic() + HANG_GUARD
    while not (run / "checkpoint-8").is_dir():
        assert proc.poll() is None, (
            f"training ended before it could be killed: {proc.communicate()[1][-2000:]}"
        )
        assert time.monotonic() < deadline, f"no checkpoint within {HANG_GUARD} s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    code, _, _ = finish(proc)
    assert code == -signal.SIGKILL
    assert not (run / "adapter_model.safetensors").exists()  # the run really was cut short
    done = sorted(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert done and max(done) < 60

    # 2. Resume from the latest complete checkpoint and finish.
    code, out, err = finish(cli("train", str(config), "resume_from_checkpoint=true"))
    assert code == 0, err[-3000:]
    assert f"checkpoint-{max(done)}" in err  # said where it resumed from
    state = json.loads((run / "checkpoint-60" / "trainer_state.json").read_text())
    assert state["global_step"] == 60
    steps = [e["step"] for e in state["log_history"] if "loss" in e]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # one loss per logging step, none repeated
    counts = [e["num_tokens"] for e in state["log_history"] if "loss" in e]
    assert all(b > a for a, b in itertools.pairwise(counts)), counts  # num_tokens goes on after resuming
    results = json.loads((run / "all_results.json").read_text())
    assert results["eval_loss"] < results["eval_before_loss"]
    assert (run / "metrics.jsonl").is_file() and (run / "README.md").is_file()

    # 3. Report.
    code, out, err = finish(cli("report", str(run)))
    assert code == 0, err[-2000:]
    assert "<svg" in (run / "report.html").read_text() and (run / "report.png").stat().st_size > 0

    # 4. Merge: a full model that plain transformers loads.
    merged = tmp_path / "merged"
    code, out, err = finish(cli("merge", str(run), str(merged)))
    assert code == 0, err[-2000:]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # 5. Generate with the merged model and with the run (adapter): the same greedy answer.
    answers = []
    for target in (run, merged):
        code, out, err = finish(cli("generate", str(target), "--prompt", "Count the words: sun sun sun"))
        assert code == 0, err[-2000:]
        answers.append(out.strip())
    assert answers[0] == answers[1] and answers[0]
