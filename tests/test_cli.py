"""The ``sftrainer`` command, driven end to end on the built-in tiny model: help, the demo in a
shortened mode, LoRA from a shipped config, and user errors (exit code 2, a message, no traceback).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftrainer.cli import main
from sftrainer.run_config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Run by their own tests below: the demo (what builtin-full.yaml spells out) and builtin-lora.yaml.
RUN_ELSEWHERE = {"builtin-full.yaml", "builtin-lora.yaml"}
# Sharded across GPUs (FSDP2, DeepSpeed): on a machine without one they must stop with a clear error.
NEEDS_GPUS = {"fsdp2.yaml": "fsdp", "zero2.yaml": "deepspeed", "zero3.yaml": "deepspeed"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_message(err: str) -> str:
    """The error the CLI printed, from 'sftrainer: error:' on (logs and progress bars come before it)."""
    assert "sftrainer: error: " in err, err
    return err[err.index("sftrainer: error: ") :].strip()


# ---- help ----------------------------------------------------------------------------------


def test_main_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "usage: sftrainer",
        "train",
        "data",
        "CONFIG",
        "key=value",
        "demo",
        "sftrainer train --help",
    ):
        assert text in out, f"{text!r} missing from --help"


def test_train_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("usage: sftrainer train [-h] [--nproc N] [--accelerate-config FILE] [CONFIG.yaml] [key=value ...]", "With no CONFIG", "built-in",
                 "demo", "key=value", "configs/builtin-lora.yaml"):  # fmt: skip
        assert text in out, f"{text!r} missing from train --help"
    # every key is documented, under the name the YAML and the overrides use
    for key in ("max_length", "train_on", "packing", "lora.r", "lora.alpha", "model.name_or_path",
                "data.train", "data.eval_split", "data.split", "data.eval_split_name", "data.subset",
                "data.data_files"):  # fmt: skip
        assert f"  {key}: " in out, f"{key} missing from train --help"


def test_train_help_lists_every_training_arguments_key_in_groups(capsys):
    import dataclasses

    from transformers import TrainingArguments

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    keys = [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")]
    missing = [key for key in keys if f"\n  {key}: " not in out]
    assert not missing, f"TrainingArguments keys missing from train --help: {missing}"
    groups = [line for line in out.splitlines() if line.startswith("TrainingArguments keys: ")]
    assert groups[:3] == [
        f"TrainingArguments keys: {g}" for g in ("optimisation", "schedule", "precision, memory and speed")
    ]
    assert out.index("SFT keys") < out.index(groups[0]) < out.index("model: keys")
    # each key under its group, with transformers' help text
    optimisation = out[out.index(groups[0]) : out.index(groups[1])]
    assert "\n  weight_decay: " in optimisation and "\n  save_steps: " not in optimisation
    assert (
        "  adam_beta1: "
        + " ".join(TrainingArguments.__dataclass_fields__["adam_beta1"].metadata["help"].split())
        in out
    )


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: sftrainer" in capsys.readouterr().err


def test_version(capsys):
    from sftrainer import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


# ---- startup: fast and quiet ------------------------------------------------------------

HEAVY = ("torch", "transformers", "datasets", "peft")


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """A fresh interpreter (imports are per process); PYTHONPATH and the rest of the env inherited."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kwargs)


def test_importing_the_cli_does_not_import_torch():
    proc = python("-c", "import sftrainer.cli, sys; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_nothing_heavy(flag):
    """`sftrainer --help` answers at once: -X importtime lists every module the real entry point imported."""
    proc = python("-X", "importtime", "-m", "sftrainer", flag)
    assert proc.returncode == 0, proc.stderr
    assert "sftrainer" in proc.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "sftrainer.cli" in imported
    assert not [m for m in imported if m.split(".")[0] in HEAVY]


def test_public_names_still_import_from_the_package():
    proc = python("-c", "import sftrainer.train, sftrainer; from sftrainer import SFTTrainer, SFTConfig, "
                  "load_config, train; print(SFTTrainer.__name__, SFTConfig.__name__, callable(train), "
                  "sftrainer.train is train)")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["SFTTrainer", "SFTConfig", "True", "True"]


# What each dependency logs, word for word (sftrainer/notices.py names the versions).
KNOWN_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: Kernel "
    "repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust status.",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
    "because Hugging Face Hub is in offline mode.",
    "torchao": "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: "
    "Could not load this library: /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so",
    "torchao.kernel.intmm": "Warning: Detected no triton, on systems without Triton certain kernels will not work",
    "torch.utils._pytree": "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
    "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses is deprecated",
}
NOTICE_WORDS = ("gemm_4bit", "quantization-bitsandbytes", "_C_mxfp8", "_C_cutlass", "Detected no triton", "KernelPreference",
                "ScaleCalculationMode")  # fmt: skip


@pytest.mark.parametrize(
    "setup", ["", "logging.basicConfig(level='INFO')\n"], ids=["no-logging", "cli-logging"]
)
def test_known_third_party_notices_are_debug_only(setup):
    """The notices dependencies log at import (see sftrainer/notices.py) show neither with Python's
    default logging nor at the CLI's INFO level; other warnings of the same loggers still show."""
    lines = ["import logging, sftrainer", setup]
    for name, message in KNOWN_NOTICES.items():
        lines += [f"logging.getLogger({name!r}).warning({message!r})",
                  f"logging.getLogger({name!r}).warning('another warning of ' + {name!r})"]  # fmt: skip
    proc = python("-c", "\n".join(lines))
    assert proc.returncode == 0, proc.stderr
    assert not [word for word in NOTICE_WORDS if word in proc.stderr], proc.stderr
    for name in KNOWN_NOTICES:
        assert f"another warning of {name}" in proc.stderr
    # At DEBUG they are there, as DEBUG records (torch keeps its own loggers at WARNING).
    proc = python("-c", "\n".join([lines[0], "logging.basicConfig(level='DEBUG')", *lines[2:]]))
    assert "DEBUG:bitsandbytes.backends.cpu.ops:Failed to load CPU gemm_4bit_forward" in proc.stderr
    assert "DEBUG:torchao.kernel.intmm:Warning: Detected no triton" in proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("torchao") is None,
    reason="torchao (the torchao extra) is not installed, so its import-time messages cannot appear; "
    "CI installs .[dev] only",
)
def test_a_command_with_torchao_installed_shows_sftrainer_messages_and_real_warnings_only(tmp_path):
    """With torchao importable, `sftrainer data` printed torchao's failed .so loads, "Detected no
    triton", torch's pytree deprecation and bitsandbytes' / kernels' kernel notices."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # offline, kernels adds its own notice
    proc = python("-m", "sftrainer", "data", "--rows", "0", f"output_dir={tmp_path}", "save_strategy=no",
                  "save_steps=10", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not [word for word in NOTICE_WORDS if word in proc.stderr], proc.stderr
    assert "Enum subclass" not in proc.stderr and "_pytree" not in proc.stderr
    assert "WARNING sftrainer.config: save_steps=10 has no effect" in proc.stderr  # a real warning
    assert "INFO sftrainer.data.prepare: train data: 6000 rows" in proc.stderr


@pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="bitsandbytes (the quant extra) is not installed, so its import-time notice cannot appear",
)
def test_commands_print_nothing_from_bitsandbytes_at_import():
    proc = python("-m", "sftrainer", "train", "--help")  # imports transformers -> peft -> bitsandbytes
    assert proc.returncode == 0, proc.stderr
    assert "bitsandbytes" not in proc.stderr and "gemm_4bit" not in proc.stderr


# ---- user errors: exit 2, one message, no traceback -------------------------------------


def test_yaml_typo_exits_2_without_traceback(tmp_path):
    """Through a real process, so the exit code and the absence of a traceback are the user's."""
    path = tmp_path / "typo.yaml"
    path.write_text("learnin_rate: 1.0e-4\nlora:\n  rank: 8\n")
    proc = subprocess.run(
        [sys.executable, "-m", "sftrainer", "train", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    message = error_message(proc.stderr)
    assert message.startswith(f"sftrainer: error: {path}: 2 problem(s)")
    assert "unknown key 'learnin_rate' (did you mean 'learning_rate'?)" in message
    assert "unknown key 'lora.rank' (did you mean 'lora.r'?)" in message
    assert "\n\n" not in message  # one paragraph


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["lora.r=abc"], "lora.r: expected an integer, got 'abc'"),
        (["train_on=everything", "max_length=0"], "2 problem(s)"),
        (["nope.yaml"], "config file not found: nope.yaml"),
        (["empty.yaml", "lora"], "override 'lora': expected key=value"),
        (["empty.yaml", "other.yaml"], "override 'other.yaml': expected key=value"),
        (["lr_scheduler_type=cosin"], "did you mean 'cosine'?"),
        (["chat_template=templates/chatml.jinja"], "chat_template: no such file: templates/chatml.jinja"),
    ],
)
def test_config_errors_exit_2(capsys, tmp_path, monkeypatch, items, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# all defaults\n")
    code, out, err = run_cli(capsys, "train", *items)
    assert code == 2
    assert expected in error_message(err)
    assert "Traceback" not in err and out == ""


def test_yaml_syntax_error_exits_2(capsys, tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("lora:\n  r: [8, 16\n  alpha: 32\n")
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2
    assert error_message(err).startswith(f"sftrainer: error: {path}:")
    assert "invalid YAML" in err


def test_bad_data_file_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    code, out, err = run_cli(capsys, "train", f"data.train={bad}", f"output_dir={tmp_path / 'out'}")
    assert code == 2
    message = error_message(err)
    assert f"{bad}:2" in message and "invalid JSON" in message
    assert "\n\n" not in message and "Traceback" not in err
    assert out == ""
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_missing_data_file_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", f"data.train={tmp_path / 'nope.jsonl'}", f"output_dir={tmp_path}")
    assert code == 2
    assert "nope.jsonl" in error_message(err)


# ---- resume ------------------------------------------------------------------------------


def test_resume_from_checkpoint_true_resumes_the_latest_checkpoint(capsys, caplog, tmp_path):
    """`resume_from_checkpoint=true` (Trainer's idiom) on the command line: the latest checkpoint."""
    out_dir = tmp_path / "run"
    short = [f"output_dir={out_dir}", "data.eval=null", "exact_match_samples=0", "per_device_train_batch_size=8",
             "save_strategy=steps", "save_steps=2", "logging_steps=1"]  # fmt: skip
    code, _, err = run_cli(capsys, "train", *short, "max_steps=2")
    assert code == 0, err
    # Mark the checkpoint's state: the resumed run carries the mark on only if it started from it.
    state_file = out_dir / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["log_history"][0]["loss"] = 123.0
    state_file.write_text(json.dumps(state))
    with caplog.at_level("INFO", logger="sftrainer"):
        code, _, err = run_cli(capsys, "train", *short, "max_steps=4", "resume_from_checkpoint=true")
    assert code == 0, err
    assert f"Resuming from the latest checkpoint, {out_dir / 'checkpoint-2'}" in caplog.text
    state = json.loads((out_dir / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [(e["step"], e["loss"] == 123.0) for e in state["log_history"] if "loss" in e] == [
        (1, True),
        (2, False),
        (3, False),
        (4, False),
    ]


def test_a_second_run_into_a_used_output_dir_exits_2_then_overwrites_and_resumes(capsys, caplog, tmp_path):
    """The same command twice: refused before any work, naming the directory, what it holds and the
    ways out; overwrite_output_dir=true starts metrics.jsonl over; resume_from_checkpoint=true goes on."""
    out_dir = tmp_path / "run"
    short = [f"output_dir={out_dir}", "data.eval=null", "exact_match_samples=0", "per_device_train_batch_size=8",
             "save_strategy=steps", "save_steps=2", "logging_steps=1"]  # fmt: skip

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]

    code, _, err = run_cli(capsys, "train", *short, "max_steps=4")
    assert code == 0, err
    assert steps() == [1, 2, 3, 4, 4]  # the losses, then the summary
    code, out, err = run_cli(capsys, "train", *short, "max_steps=4")
    assert code == 2 and out == "" and "Traceback" not in err
    message = error_message(err)
    assert message.startswith(
        f"sftrainer: error: output_dir {out_dir} already holds a training run (checkpoint-2, checkpoint-4; "
        "metrics.jsonl logging training up to step 4)"
    )
    for way_out in ("resume_from_checkpoint=true", "overwrite_output_dir=true", "another output_dir"):
        assert way_out in message
    assert steps() == [1, 2, 3, 4, 4]

    with caplog.at_level("WARNING", logger="sftrainer"):
        code, _, err = run_cli(capsys, "train", *short, "max_steps=2", "overwrite_output_dir=true")
    assert code == 0, err
    assert "removed the earlier run's checkpoint-2, checkpoint-4, metrics.jsonl" in caplog.text
    assert steps() == [1, 2, 2]
    assert sorted(p.name for p in out_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert "overwrite_output_dir" not in yaml.safe_load((out_dir / "sftrainer_config.yaml").read_text())

    code, _, err = run_cli(capsys, "train", *short, "max_steps=4", "resume_from_checkpoint=true")
    assert code == 0, err
    assert steps() == [1, 2, 2, 3, 4, 4]
    code, _, err = run_cli(
        capsys, "train", *short, "overwrite_output_dir=true", "resume_from_checkpoint=true"
    )
    assert code == 2
    assert "overwrite_output_dir: true removes the checkpoints that resume_from_checkpoint" in error_message(
        err
    )


@pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")
def test_ctrl_c_names_the_last_checkpoint_and_a_command_that_resumes_it(tmp_path, tiny_model_dir):
    """SIGINT mid-run (Ctrl-C): exit 130, the last complete checkpoint and the command line as run plus
    resume_from_checkpoint=true; that command resumes from that checkpoint."""
    import shlex
    import signal
    import time

    from sftrainer.checkpoint import latest_checkpoint

    out_dir = tmp_path / "run"
    argv = ["train", f"output_dir={out_dir}", "data.eval=null", "exact_match_samples=0", "max_steps=1000",
            "per_device_train_batch_size=8", "save_steps=2", "logging_steps=1", "disable_tqdm=true"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = tmp_path / "stdout", tmp_path / "stderr"  # files, not pipes: nobody reads them while it runs
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sftrainer", *argv],
            env=env,
            stdout=stdout,
            stderr=stderr,
            # A test run started in the background of a non-interactive shell ignores SIGINT, and a
            # child inherits that (Python then installs no KeyboardInterrupt handler): undo it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        try:
            deadline = time.monotonic() + 600  # a hang guard: it takes seconds
            while not (out_dir / "checkpoint-2").is_dir():
                assert proc.poll() is None, f"training ended before Ctrl-C: {logs[1].read_text()[-2000:]}"
                assert time.monotonic() < deadline, "no checkpoint within 600 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=120)
        finally:
            proc.kill()
    err = logs[1].read_text()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    last = latest_checkpoint(out_dir)
    resume = shlex.join([sys.executable, "-m", "sftrainer", *argv, "resume_from_checkpoint=true"])
    assert err.rstrip().endswith(
        f"sftrainer: interrupted\nThe last complete checkpoint is {last}. To resume from it:\n  {resume}"
    )

    step = int(last.rsplit("-", 1)[1])
    logged = len((out_dir / "metrics.jsonl").read_text().splitlines())  # the interrupted run's records
    done = subprocess.run([*shlex.split(resume), f"max_steps={step + 1}"], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Resuming from the latest checkpoint, {last}" in done.stderr
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()[logged:]]
    assert [r["step"] for r in records if "loss" in r] == [step + 1]  # one step after the checkpoint's


def test_save_steps_on_the_command_line_saves_with_the_builtin_config(capsys, caplog, tmp_path):
    """The demo config says save_strategy: 'no'; `sftrainer train save_steps=10` still saves at step 10."""
    out_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="sftrainer"):
        code, _, err = run_cli(capsys, "train", f"output_dir={out_dir}", "data.eval=null", "exact_match_samples=0",
                               "per_device_train_batch_size=8", "max_steps=10", "save_steps=10")  # fmt: skip
    assert code == 0, err
    assert (out_dir / "checkpoint-10" / "trainer_state.json").is_file()
    assert (
        "save_steps=10 on the command line: save_strategy set to 'steps' (the built-in config sets 'no')"
        in (caplog.text)
    )


def test_resume_from_checkpoint_true_without_a_checkpoint_exits_2(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "train", f"output_dir={tmp_path / 'fresh'}", "resume_from_checkpoint=true"
    )
    assert code == 2 and out == ""
    assert error_message(err) == (
        f"sftrainer: error: resume_from_checkpoint: true, but {tmp_path / 'fresh'} holds no checkpoint-<step> "
        "directory (checkpoints are written every save_steps with save_strategy: steps)"
    )
    code, _, err = run_cli(capsys, "train", f"resume_from_checkpoint={tmp_path / 'nope'}")
    assert code == 2
    assert f"no such checkpoint directory: {tmp_path / 'nope'}" in error_message(err)


def test_rerunning_the_saved_config_reproduces_the_run(capsys, tmp_path):
    """`sftrainer train OUT/sftrainer_config.yaml output_dir=OUT2` ends with the same weights."""
    from safetensors.torch import load_file

    first, second = tmp_path / "first", tmp_path / "second"
    code, _, err = run_cli(capsys, "train", f"output_dir={first}", "data.eval=null", "exact_match_samples=0",
                           "max_steps=3", "per_device_train_batch_size=8", "learning_rate=1e-2")  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", str(first / "sftrainer_config.yaml"), f"output_dir={second}")
    assert code == 0, err
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    saved = yaml.safe_load((second / "sftrainer_config.yaml").read_text())
    assert {**saved, "output_dir": str(first)} == yaml.safe_load(
        (first / "sftrainer_config.yaml").read_text()
    )


def test_train_streams_a_file_and_packs_it_on_the_fly(capsys, caplog, tmp_path):
    """data.streaming: the demo file read as a stream, tokenized and packed while training."""
    from sftrainer import builtin

    with caplog.at_level("INFO", logger="sftrainer"):
        code, _, err = run_cli(capsys, "train", f"output_dir={tmp_path / 'run'}", "data.eval=null",
                               "exact_match_samples=0", "data.streaming=true", "max_steps=3", "packing=true",
                               f"data.train={builtin.data_files()[0]}", "per_device_train_batch_size=2")  # fmt: skip
    assert code == 0, err
    assert "packed on the fly (streaming)" in caplog.text
    assert "train data: 2000 rows read so far" in caplog.text  # one packing window of the 6,000 rows
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3 and "train_loss" in logged[-1]


def test_nan_loss_exits_2_naming_the_step(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", f"output_dir={out_dir}", "data.eval=null", "exact_match_samples=0",
                             "max_steps=8", "per_device_train_batch_size=8", "learning_rate=1e30",
                             "max_grad_norm=0", "save_strategy=steps", "save_steps=1")  # fmt: skip
    assert code == 2 and "Traceback" not in err and out == ""
    message = error_message(err)
    # lr 1e30: the weights overflow within a few steps; whichever guard sees it first names the step.
    assert re.match(r"sftrainer: error: the (training loss is (nan|inf) at|weights hold nan or inf after) step \d+\b",
                    message), message  # fmt: skip
    assert "is kept" in message or "no checkpoint was written" in message
    assert not (out_dir / "model.safetensors").exists()
    for checkpoint in out_dir.glob("checkpoint-*"):  # every checkpoint left is a good one
        assert "nan" not in json.dumps(
            json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
        )


# ---- the demo, shortened ------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, sftrainer_home):
    """`sftrainer train` with no config, cut to 30 steps and 20 exact-match samples."""
    out_dir = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()  # capsys is function-scoped: capture the summary by hand
    with contextlib.redirect_stdout(stdout):
        code = main(["train", f"output_dir={out_dir}", "max_steps=30", "exact_match_samples=20"])
    return code, stdout.getvalue(), out_dir


def test_demo_exit_code_and_summary(demo_run):
    code, out, out_dir = demo_run
    assert code == 0
    assert "Training finished in" in out and "train loss" in out
    lines = out.splitlines()
    header = next(
        line for line in lines if line.split()[:1] == ["before"]
    )  # not "eval_before @ step 0 | ..."
    assert header.split() == ["before", "after"]
    loss = next(line for line in lines if line.strip().startswith("eval_loss"))
    exact = next(line for line in lines if line.strip().startswith("eval_exact_match"))
    results = json.loads((out_dir / "all_results.json").read_text())
    assert loss.split()[1:] == [f"{results['eval_before_loss']:.4f}", f"{results['eval_loss']:.4f}"]
    before, after = results["eval_before_exact_match"], results["eval_exact_match"]
    assert exact.split()[1:] == [f"{before:.4f}", f"{after:.4f}"]
    assert f"Saved to {out_dir}" in out
    assert str(out_dir / "all_results.json") in out


def test_demo_metrics(demo_run):
    _, _, out_dir = demo_run
    results = json.loads((out_dir / "all_results.json").read_text())
    for key in ("eval_loss", "eval_before_loss", "eval_exact_match", "eval_before_exact_match", "train_loss"):
        assert key in results, f"{key} missing from all_results.json"
    assert 0.0 <= results["eval_exact_match"] <= 1.0
    assert 0.0 <= results["eval_before_exact_match"] <= 1.0
    assert results["eval_loss"] < results["eval_before_loss"]  # 30 steps already learn something


def test_demo_writes_a_loadable_model(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, out_dir = demo_run
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                 "sftrainer_config.yaml", "all_results.json"):  # fmt: skip
        assert (out_dir / name).is_file(), f"{name} not written"
    assert not (out_dir / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.chat_template, "the tokenizer was saved without its chat template"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Sort the words: cat apple"}],
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert model.config.model_type == "llama"


def test_demo_saves_the_resolved_config(demo_run):
    """sftrainer_config.yaml is the demo config plus the overrides, every default filled in, and loads
    back as a config; run_info.json names the versions and the command line."""
    from sftrainer import builtin

    _, _, out_dir = demo_run
    saved = yaml.safe_load((out_dir / "sftrainer_config.yaml").read_text())
    assert saved["max_steps"] == 30 and saved["exact_match_samples"] == 20
    assert saved["output_dir"] == str(out_dir)
    assert saved["learning_rate"] == builtin.DEMO_CONFIG["learning_rate"]
    assert saved["model"]["name_or_path"] == builtin.DEMO_CONFIG["model"]["name_or_path"]
    assert saved["model"]["dtype"] == "auto" and saved["truncation_mode"] == "keep_start"  # defaults
    cfg = load_config(out_dir / "sftrainer_config.yaml")
    assert cfg.train.max_steps == 30 and cfg.data.train == "builtin"
    info = json.loads((out_dir / "run_info.json").read_text())
    assert info["command"] == sys.argv  # this process's command line (pytest's, here)
    assert info["versions"]["sftrainer"] and info["versions"]["transformers"] and info["versions"]["torch"]


# ---- LoRA from the shipped config ---------------------------------------------------------


def test_lora_run_from_shipped_config(capsys, tmp_path, monkeypatch):
    import safetensors.torch

    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "lora"
    code, out, err = run_cli(
        capsys, "train", "configs/builtin-lora.yaml", f"output_dir={out_dir}", "max_steps=5",
        "exact_match_samples=0", "per_device_train_batch_size=8", "lora.r=4", "lora.alpha=8",
    )  # fmt: skip
    assert code == 0, err
    assert (out_dir / "adapter_config.json").is_file()
    assert (out_dir / "adapter_model.safetensors").is_file()
    assert not (out_dir / "model.safetensors").exists()  # an adapter, not a full copy of the model
    adapter = json.loads((out_dir / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    weights = safetensors.torch.load_file(out_dir / "adapter_model.safetensors")
    assert weights and all("lora_" in name for name in weights)
    results = json.loads((out_dir / "all_results.json").read_text())
    assert "eval_loss" in results and "eval_before_loss" in results
    assert "Saved to" in out


# ---- every other shipped config runs ------------------------------------------------------


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if p.name not in RUN_ELSEWHERE | NEEDS_GPUS.keys()], ids=lambda p: p.name
)
def test_shipped_config_runs(capsys, tmp_path, monkeypatch, path):
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "out"
    overrides = [f"output_dir={out_dir}", "max_steps=2", "exact_match_samples=0"]
    code, _, err = run_cli(capsys, "train", f"configs/{path.name}", *overrides)
    assert code == 0, error_message(err)
    assert (out_dir / "all_results.json").is_file()
    saved = (out_dir / "adapter_model.safetensors", out_dir / "model.safetensors")
    assert any(p.is_file() for p in saved)


@pytest.mark.parametrize("name", sorted(NEEDS_GPUS))
def test_gpu_configs_stop_before_training_on_a_machine_without_gpus(capsys, tmp_path, monkeypatch, name):
    from sftrainer import precision, sharding

    if precision.has_accelerator():
        pytest.skip("this machine has an accelerator: the config would train (tests/test_sharded_gpu.py)")
    monkeypatch.chdir(REPO)
    out_dir = tmp_path / "out"
    for launcher in ([], ["--nproc", "2"]):  # in this process, and before starting any
        code, _, err = run_cli(capsys, "train", f"configs/{name}", f"output_dir={out_dir}", *launcher)
        assert code == 2
        message = error_message(err)
        key = NEEDS_GPUS[name]
        if key == "deepspeed" and not sharding.deepspeed_available() and not launcher:
            assert "deepspeed: DeepSpeed is not installed: pip install deepspeed" in message
        else:
            assert f"{key}: " in message and "this machine has no GPU" in message
            assert f"remove {'fsdp and fsdp_config' if key == 'fsdp' else 'deepspeed'}" in message
        assert "torch.distributed.run" not in err  # nothing was launched
        assert not out_dir.exists()  # and nothing trained
