"""Several processes: ``sftrainer.distributed`` and training under torchrun (CPU, gloo).

The ``distributed`` tests run tests/dist_train.py twice at once: in 1 process at batch 8, and under
``torchrun --standalone --nproc_per_node=2`` at batch 4 per process (DDP over gloo), each padded then
packed, and compare the per-step losses and final weights; the 2-process run is also resumed from
its step-2 checkpoint. Deselect them with ``-m "not distributed"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model

from sftrainer import cli
from sftrainer.distributed import launch_command
from sftrainer.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("dist_train.py")
STEPS = 4  # dist_train.STEPS
# Measured (2 x 4 vs 1 x 8, 4 steps, lr 1e-3): max weight difference 1.2e-7 padded, 4.3e-7 packed;
# max loss difference 9.5e-7; resumed vs uninterrupted (2 processes): identical. One optimizer step
# moves the weights by about 1e-3.
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5


# ---- the launch command (no processes) ----------------------------------------------------------


def test_launch_command_runs_torchrun_standalone_with_the_same_arguments(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    command = launch_command("cfg.yaml", ["lora.r=8", "max_steps=3"], 4, gpus=8)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-6:] == ["-m", "sftrainer", "train", "cfg.yaml", "lora.r=8", "max_steps=3"]
    assert launch_command(None, ["output_dir=x"], 2)[-4:] == ["-m", "sftrainer", "train", "output_dir=x"]


@pytest.mark.parametrize(
    ("nproc", "gpus", "env", "message"),
    [
        (0, None, {}, "1 or more"),
        (4, 2, {}, "has 2 GPU"),
        (2, None, {"LOCAL_RANK": "0"}, "already started by torchrun"),
    ],
)
def test_launch_command_refuses_what_cannot_work(monkeypatch, nproc, gpus, env, message):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        launch_command("cfg.yaml", [], nproc, gpus)


def test_cli_nproc_launches_and_returns_the_launchers_exit_code(monkeypatch, capsys):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    ran = []

    def fake_run(command, check):
        ran.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    # The option may come between the config file and the overrides.
    assert cli.main(["train", "cfg.yaml", "--nproc", "2", "max_steps=3"]) == 3
    assert ran[0][-5:] == ["-m", "sftrainer", "train", "cfg.yaml", "max_steps=3"]
    assert "--nproc_per_node=2" in ran[0]
    assert "torch.distributed.run" in capsys.readouterr().err


def test_cli_nproc_inside_a_launched_process_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", "cfg.yaml", "--nproc", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err


def test_cli_rejects_unknown_options_after_the_config():
    with pytest.raises(SystemExit):
        cli.main(["train", "cfg.yaml", "--nprocs", "2"])


# ---- 2 processes (torchrun, gloo) vs 1 ---------------------------------------------------------


def _rows(n: int) -> list[dict[str, str]]:
    from sftrainer.builtin import WORDS

    # Different prompt and response lengths: padding and packing both matter.
    return [
        {
            "prompt": "Repeat: " + " ".join(WORDS[(i + k) % 24] for k in range(1 + i % 5)),
            "response": " ".join(WORDS[(3 * i + k) % 24] for k in range(1 + (i * 7) % 9)),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir) -> dict[str, tuple[Path, str]]:
    """{"single": (out_dir, output), "ddp": (out_dir, output)}: the two runs, started together."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("dist")
    model_dir = save_tiny_model("llama", AutoTokenizer.from_pretrained(tiny_model_dir), tmp / "model")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(160)), encoding="utf-8")
    procs = {}
    for name, launcher, batch in (
        ("single", [], 8),
        ("ddp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], 4),
    ):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "SFTRAINER_HOME": str(tmp / name / "home"),  # each builds the demo data afresh
            "HF_DATASETS_CACHE": str(tmp / name / "datasets"),
        }
        out = tmp / name / "out"
        command = [sys.executable, *launcher, str(SCRIPT), str(model_dir), str(data), str(out), str(batch)]
        procs[name] = (
            out,
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        )
    results = {}
    for name, (out, proc) in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} run failed:\n{output[-4000:]}"
        results[name] = (out, output)
    return results


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["padded", "packed"])
def test_two_processes_at_batch_4_train_like_one_at_batch_8(runs, variant):
    single, ddp = runs["single"][0] / variant, runs["ddp"][0] / variant
    one, two = _losses(single), _losses(ddp)
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
    assert max(abs(a - b) for (_, a), (_, b) in zip(one, two)) <= LOSS_TOL
    assert one[0][1] != one[-1][1]  # it trained

    first, second = load_file(single / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert first.keys() == second.keys()
    worst = max((first[k] - second[k]).abs().max().item() for k in first)
    assert worst <= WEIGHT_TOL, f"max weight difference {worst:.2e}"
    init = load_file(single.parents[2] / "model" / "model.safetensors")
    moved = max((first[k] - init[k]).abs().max().item() for k in first)
    assert moved > 100 * WEIGHT_TOL  # the comparison is not of untrained weights
    assert torch.isfinite(torch.tensor(worst))


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["padded", "packed"])
def test_only_the_main_process_writes_the_run_directory(runs, variant):
    run_dir = runs["ddp"][0] / variant
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "a step was logged twice: more than one process appends"
    assert sum("train_runtime" in r for r in records) == 1
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "model.safetensors",
        "run_info.json",
        "sftrainer_config.yaml",
        "README.md",
        "report.html",
    } <= names
    assert {"checkpoint-2", "checkpoint-4"} <= names
    leftovers = [n for n in names if n.startswith(("tmp-", ".")) or n.endswith(".tmp")]
    assert not leftovers


@pytest.mark.distributed
def test_resuming_a_two_process_run_ends_where_the_uninterrupted_run_did(runs):
    out = runs["ddp"][0]
    uninterrupted, resumed = (
        load_file(out / "padded" / "model.safetensors"),
        load_file(out / "resumed" / "model.safetensors"),
    )
    worst = max((uninterrupted[k] - resumed[k]).abs().max().item() for k in uninterrupted)
    assert worst <= WEIGHT_TOL, f"max weight difference {worst:.2e}"
    after = [(s, loss) for s, loss in _losses(out / "resumed") if s > 2]
    assert [s for s, _ in after] == [3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(after, _losses(out / "padded")[2:])) <= LOSS_TOL


@pytest.mark.distributed
def test_the_demo_data_is_built_by_one_process(runs):
    output = runs["ddp"][1]
    # Without main_process_first both processes find no data and build it.
    assert output.count("Built the demo data set") == 1
