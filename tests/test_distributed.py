"""Several processes: ``sftrainer.distributed`` and training under torchrun (CPU, gloo).

The ``distributed`` tests run tests/dist_train.py twice at once: in 1 process at batch 8, and under
``torchrun --standalone --nproc_per_node=2`` at batch 4 per process (DDP over gloo), each padded then
packed, and compare the per-step losses and final weights; the 2-process run is also resumed from
its step-2 checkpoint, by 2 processes and by 1 (at the same effective batch; at another it is
refused). Two more 2-process runs lose rank 1 after step 2 (an exception, SIGKILL): the job ends.
Deselect them with ``-m "not distributed"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_models import save_tiny_model

from sftrainer import cli
from sftrainer.checkpoint import latest_checkpoint
from sftrainer.errors import ConfigError
from sftrainer.launch import launch_command

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("dist_train.py")
STEPS = 4  # dist_train.STEPS
# Measured (2 x 4 vs 1 x 8, 4 steps, lr 1e-3): max weight difference 1.2e-7 padded, 4.3e-7 packed;
# max loss difference 9.5e-7; resumed vs uninterrupted (2 processes): identical. One optimizer step
# moves the weights by about 1e-3.
WEIGHT_TOL = 1e-5
LOSS_TOL = 1e-5


# ---- the launch command (no processes) ----------------------------------------------------------


@pytest.fixture
def not_launched(monkeypatch):
    for name in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)


def test_launch_command_runs_torchrun_standalone_with_the_same_arguments(not_launched):
    command = launch_command("cfg.yaml", ["lora.r=8", "max_steps=3"], 4, gpus=8)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nproc_per_node=4" in command
    assert command[-6:] == ["-m", "sftrainer", "train", "cfg.yaml", "lora.r=8", "max_steps=3"]
    cpu = launch_command(None, ["output_dir=x"], 3, gpus=0, use_cpu=True)  # CPU processes: any number
    assert cpu[-4:] == ["-m", "sftrainer", "train", "output_dir=x"] and "--nproc_per_node=3" in cpu
    assert "--nproc_per_node=16" in launch_command(None, [], 16, gpus=2, use_cpu=True)


@pytest.mark.parametrize(
    ("nproc", "gpus", "env", "message"),
    [
        (0, None, {}, "1 or more"),
        (4, 2, {}, "has 2 GPU"),
        (2, None, {"LOCAL_RANK": "0"}, "already started by torchrun"),
        (2, 0, {}, "this machine has no GPU, and each process trains on one; .* add use_cpu=true"),
    ],
)
def test_launch_command_refuses_what_cannot_work(monkeypatch, not_launched, nproc, gpus, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        launch_command("cfg.yaml", [], nproc, gpus)


def accelerate_config(tmp_path: Path, **settings) -> str:
    path = tmp_path / "accelerate.yaml"
    base = {"distributed_type": "MULTI_GPU", "num_machines": 1, "num_processes": 2, "use_cpu": False}
    path.write_text(yaml.safe_dump({**base, **settings}), encoding="utf-8")
    return str(path)


def test_launch_command_through_an_accelerate_config(tmp_path, not_launched):
    path = accelerate_config(tmp_path, distributed_type="FSDP")
    command = launch_command("cfg.yaml", ["max_steps=3"], None, gpus=2, accelerate_config=path)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path]
    assert command == [*launcher, "-m", "sftrainer", "train", "cfg.yaml", "max_steps=3"]
    # --nproc overrides the file's num_processes
    assert launch_command("cfg.yaml", [], 1, gpus=2, accelerate_config=path)[5:7] == ["--num_processes", "1"]


@pytest.mark.parametrize(
    ("settings", "gpus", "engine", "message"),
    [
        (
            {"distributed_type": "FSDP"},
            0,
            None,
            "distributed_type: FSDP trains on GPUs, and this machine has none",
        ),
        ({"num_processes": 4}, 2, None, "4 processes, and this machine has 2 GPU"),
        (
            {"num_machines": 2},
            8,
            None,
            "num_machines: 2; sftrainer train starts processes on this machine only",
        ),
        (
            {"distributed_type": "DEEPSPEED"},
            2,
            "fsdp",
            "the run's config sets fsdp too; set the sharding engine",
        ),
    ],
)
def test_launch_command_refuses_an_accelerate_config_that_cannot_work(
    tmp_path, not_launched, settings, gpus, engine, message
):
    path = accelerate_config(tmp_path, **settings)
    with pytest.raises(ConfigError, match=message):
        launch_command("cfg.yaml", [], None, gpus=gpus, accelerate_config=path, engine=engine)
    with pytest.raises(ConfigError, match="no such file"):
        launch_command("cfg.yaml", [], None, gpus=2, accelerate_config=str(tmp_path / "missing.yaml"))
    # a CPU config trains anywhere
    cpu = accelerate_config(tmp_path, distributed_type="MULTI_CPU", use_cpu=True)
    assert launch_command("cfg.yaml", [], None, gpus=0, accelerate_config=cpu)[4] == cpu


def test_the_shipped_accelerate_config_is_one_accelerate_reads(not_launched, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig

    monkeypatch.chdir(ROOT)  # the command runs from the repository root
    path = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert (
        first
        == "# sftrainer train configs/builtin-full.yaml --accelerate-config configs/accelerate/fsdp2.yaml"
    )
    settings = ClusterConfig.from_yaml_file(str(path))  # refuses unknown keys
    assert (
        str(settings.distributed_type) == "DistributedType.FSDP" and settings.fsdp_config["fsdp_version"] == 2
    )
    command = launch_command(
        "configs/builtin-full.yaml", [], None, gpus=2, accelerate_config="configs/accelerate/fsdp2.yaml"
    )
    assert command[1:5] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/fsdp2.yaml",
    ]
    assert "--num_processes" not in command  # the file's 2


def cpu_config(tmp_path: Path, **extra) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"use_cpu": True, "output_dir": str(tmp_path / "out"), **extra}))
    return str(path)


def test_cli_nproc_launches_and_returns_the_launchers_exit_code(tmp_path, not_launched, monkeypatch, capsys):
    ran = []

    def fake_run(command, check):
        ran.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    config = cpu_config(tmp_path)
    # The option may come between the config file and the overrides.
    assert cli.main(["train", config, "--nproc", "2", "max_steps=3"]) == 3
    assert ran[0][-5:] == ["-m", "sftrainer", "train", config, "max_steps=3"]
    assert "--nproc_per_node=2" in ran[0]
    err = capsys.readouterr().err
    assert "torch.distributed.run" in err
    assert "the training processes failed (exit code 3)" in err and "names the rank that failed first" in err


def test_cli_nproc_checks_the_machine_before_starting_any_process(
    tmp_path, not_launched, monkeypatch, capsys
):
    from sftrainer import precision

    if precision.has_accelerator():
        pytest.skip("this machine has an accelerator")
    monkeypatch.setattr(cli.subprocess, "run", lambda *a, **k: pytest.fail("a process was started"))
    config = cpu_config(tmp_path)
    assert cli.main(["train", config, "--nproc", "2", "use_cpu=false"]) == 2
    assert "--nproc 2: this machine has no GPU" in capsys.readouterr().err
    assert cli.main(["train", config, "--nproc", "2", "fsdp=true"]) == 2
    assert "fsdp: FSDP shards the training across GPUs" in capsys.readouterr().err


def test_cli_nproc_inside_a_launched_process_is_a_clear_error(not_launched, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cli.main(["train", "cfg.yaml", "--nproc", "2"]) == 2
    assert "already started by torchrun" in capsys.readouterr().err


def test_an_error_in_a_launched_process_names_its_rank(tmp_path, not_launched, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "sftrainer: error (rank 1 of 2): config file not found" in capsys.readouterr().err


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
def test_one_process_resumes_a_two_process_checkpoint_at_the_same_effective_batch(runs, caplog):
    """2 processes x batch 4 wrote checkpoint-2; 1 process x batch 8 continues it: every step takes the
    same 8 examples, so it ends where the uninterrupted 2-process run did."""
    from dist_train import config

    from sftrainer.train import train

    out, tmp = runs["ddp"][0], runs["ddp"][0].parent.parent
    checkpoint = out / "padded" / "checkpoint-2"
    assert json.loads((checkpoint / "sftrainer_layout.json").read_text()) == {
        "world_size": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "effective_batch_size": 8,
    }
    resumed = tmp / "resumed-by-one"
    cfg = config(str(tmp / "model"), str(tmp / "train.jsonl"), str(resumed), 8, False, str(checkpoint))
    with caplog.at_level("WARNING", logger="sftrainer.checkpoint"):
        train(cfg)
    assert "checkpoint-2 was written by 2 process(es), this run has 1: the effective batch (8)" in caplog.text
    uninterrupted, continued = (
        load_file(out / "padded" / "model.safetensors"),
        load_file(resumed / "model.safetensors"),
    )
    worst = max((uninterrupted[k] - continued[k]).abs().max().item() for k in uninterrupted)
    assert worst <= WEIGHT_TOL, f"max weight difference {worst:.2e}"
    after = [(s, loss) for s, loss in _losses(resumed) if s > 2]
    assert [s for s, _ in after] == [3, 4]
    assert max(abs(a - b) for (_, a), (_, b) in zip(after, _losses(out / "padded")[2:])) <= LOSS_TOL


@pytest.mark.distributed
def test_resuming_a_two_process_checkpoint_at_another_effective_batch_is_refused(runs, tmp_path):
    from dist_train import config

    from sftrainer.train import train

    out, tmp = runs["ddp"][0], runs["ddp"][0].parent.parent
    checkpoint = out / "padded" / "checkpoint-2"
    cfg = config(
        str(tmp / "model"), str(tmp / "train.jsonl"), str(tmp_path / "out"), 4, False, str(checkpoint)
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = str(err.value)
    assert message.startswith(
        "resume_from_checkpoint: checkpoint-2 was written by 2 process(es) at an effective batch of 8"
    )
    assert "this run has 1 process(es) at 4" in message
    assert (
        "Set per_device_train_batch_size=8 to keep it, or set allow_batch_change_on_resume: true" in message
    )
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.fixture(scope="module")
def dying_runs(tmp_path_factory, runs) -> dict[str, tuple[Path, int, str]]:
    """{how: (out_dir, return code, output)}: 2 processes where rank 1 dies after step 2, by an
    exception ('raise') or SIGKILL ('kill'); both jobs started together."""
    tmp = runs["ddp"][0].parent.parent
    procs = {}
    for how in ("raise", "kill"):
        out = tmp_path_factory.mktemp(f"dying-{how}") / "out"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        command += [str(SCRIPT), "fail", how, str(tmp / "model"), str(tmp / "train.jsonl"), str(out), "4"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        procs[how] = (
            out,
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        )
    results = {}
    for how, (out, proc) in procs.items():
        try:
            output, _ = proc.communicate(timeout=300)  # a hang guard, far above the ~30 s such a run takes
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"rank 1 died ({how}) and the job did not end: the other process hangs")
        results[how] = (out, proc.returncode, output)
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_rank_that_dies_ends_the_whole_job_naming_that_rank(dying_runs, how):
    out, code, output = dying_runs[how]
    assert code != 0
    root_cause = output[output.index("Root Cause (first observed failure)") :]
    assert "rank      : 1 (local_rank: 1)" in root_cause
    expected = "exitcode  : -9" if how == "kill" else "exitcode  : 1"
    assert expected in root_cause
    if how == "raise":
        assert "RuntimeError: injected failure on rank 1 after step 2" in output
    # rank 0 was stopped in its next collective: no checkpoint of step 2, no final model
    assert latest_checkpoint(out) is None and not (out / "model.safetensors").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) <= 2


@pytest.mark.distributed
def test_the_demo_data_is_built_by_one_process(runs):
    output = runs["ddp"][1]
    # Without main_process_first both processes find no data and build it.
    assert output.count("Built the demo data set") == 1
