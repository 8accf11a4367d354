"""How ``sftrainer train --nproc N [--accelerate-config FILE]`` starts its processes.

``launch_command`` builds the command line: ``torchrun``, or ``accelerate launch --config_file`` with
``--accelerate-config FILE``; ``prepare_launch`` checks the run's machine requirements first (FSDP /
DeepSpeed need GPUs, CPU processes ``use_cpu``). What each launched process coordinates (who prepares
data first) is ``sftrainer.distributed``'s.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from sftrainer import builtin, sharding
from sftrainer.coerce import coerce
from sftrainer.distributed import is_launched
from sftrainer.errors import ConfigError
from sftrainer.precision import accelerator_type
from sftrainer.run_config import apply_overrides, read_yaml


def launch_command(
    config: str | None,
    overrides: Sequence[str],
    nproc: int | None,
    gpus: int | None = None,
    use_cpu: bool = False,
    accelerate_config: str | None = None,
    engine: str | None = None,
) -> list[str]:
    """The command that runs ``sftrainer train [config] [overrides]`` in ``nproc`` processes on this machine.

    Without ``accelerate_config``: ``torchrun --standalone`` (``python -m torch.distributed.run``), a
    rendezvous on a free local port, so two runs on one machine do not collide. With it: ``accelerate
    launch --config_file`` (``nproc`` None: the file's ``num_processes``). ``gpus``: the GPUs this machine
    has; ``use_cpu``: the run's ``use_cpu``; ``engine``: the run's sharding engine ('fsdp', 'deepspeed'
    or None). Raises ``ConfigError`` where it cannot work, before any process starts.
    """
    _refuse_bad_nproc(nproc)
    train = ["-m", "sftrainer", "train", *([config] if config is not None else []), *overrides]
    if accelerate_config is not None:
        return _accelerate_command(accelerate_config, nproc, gpus, engine) + train
    nproc = 1 if nproc is None else nproc
    if not use_cpu and not gpus:
        raise ConfigError(
            f"--nproc {nproc}: this machine has no GPU, and each process trains on one; to train "
            f"{nproc} processes on the CPU (DDP over gloo: for trying a multi-process run, slower than "
            "one process) add use_cpu=true"
        )
    if not use_cpu and gpus and nproc > gpus:  # gpus: not 0 or None here (refused above)
        raise ConfigError(
            f"--nproc {nproc}: this machine has {gpus} GPU(s), and each process trains on its own; "
            f"use --nproc {gpus} or fewer (gradient_accumulation_steps keeps the effective batch size), "
            "or add use_cpu=true for CPU processes"
        )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *train,
    ]


def _refuse_bad_nproc(nproc: int | None) -> None:
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes to start, 1 or more")
    if is_launched():
        raise ConfigError(
            f"--nproc {nproc}: this process was already started by torchrun / accelerate launch; "
            "drop --nproc (the launcher sets the number of processes) or run sftrainer without the launcher"
        )


# accelerate config `distributed_type` values that train on GPUs (or other accelerators).
ACCELERATOR_TYPES = ("MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU")


def _accelerate_command(path: str, nproc: int | None, gpus: int | None, engine: str | None) -> list[str]:
    """``accelerate launch --config_file path [--num_processes nproc]``, checked against this machine."""
    key = f"--accelerate-config {path}"
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file (write one with `accelerate config --config_file {path}`)")
    try:
        settings = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: not a YAML or JSON file: {err}") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{key}: must hold a mapping of accelerate settings")
    kind = str(settings.get("distributed_type", "NO")).upper()
    machines = int(settings.get("num_machines", 1) or 1)
    processes = nproc if nproc is not None else int(settings.get("num_processes", 1) or 1)
    if machines > 1:
        raise ConfigError(
            f"{key}: num_machines: {machines}; sftrainer train starts processes on this machine only: run "
            f"`accelerate launch --config_file {path} -m sftrainer train ...` on every machine"
        )
    on_gpus = kind in ACCELERATOR_TYPES and not settings.get("use_cpu", False)
    if on_gpus and not gpus:
        raise ConfigError(
            f"{key}: distributed_type: {kind} trains on GPUs, and this machine has none; use a config "
            "with distributed_type: MULTI_CPU (or use_cpu: true), or run on a machine with GPUs"
        )
    if on_gpus and gpus and processes > gpus:
        raise ConfigError(
            f"{key}: {processes} processes, and this machine has {gpus} GPU(s): one process trains on "
            f"each; use --nproc {gpus} or fewer"
        )
    if kind in ("FSDP", "DEEPSPEED") and engine is not None:
        raise ConfigError(
            f"{key}: distributed_type: {kind}, and the run's config sets {engine} too; set the sharding "
            "engine in one place (the run's config keys are what a plain torchrun launch reads)"
        )
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", path]
    return command + (["--num_processes", str(nproc)] if nproc is not None else [])


def prepare_launch(
    config: str | None, overrides: Sequence[str], nproc: int | None, accelerate_config: str | None = None
) -> list[str]:
    """The launch command of ``sftrainer train --nproc N [--accelerate-config FILE]``, once the run's
    machine requirements are checked: FSDP / DeepSpeed need GPUs, CPU processes need use_cpu.

    Reads the keys it needs from the YAML and the overrides without building the config: that would
    set up CUDA in this process, which only waits for the launcher. Every process validates the whole
    config when it starts.
    """
    _refuse_bad_nproc(nproc)
    raw = apply_overrides(read_yaml(config) if config is not None else builtin.DEMO_CONFIG, overrides)
    try:
        use_cpu = bool(coerce(raw.get("use_cpu", False), bool))
    except ValueError as err:
        raise ConfigError(f"use_cpu: {err}") from None
    wanted = SimpleNamespace(fsdp=raw.get("fsdp"), deepspeed=raw.get("deepspeed"), use_cpu=use_cpu)
    problems = sharding.machine_problems(wanted, accelerator_type(), launched=True)
    if problems:
        raise ConfigError("\n".join(problems))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return launch_command(
        config, overrides, nproc, gpus, use_cpu, accelerate_config, engine=sharding.engine(wanted)
    )
