"""Several processes (``torchrun``, ``accelerate launch``): who goes first, and how ``--nproc`` launches.

transformers and accelerate shard each batch across processes and reduce the gradients; what is
left to sftrainer is the work that writes shared files:

- ``main_process_first(args)``: data preparation and the built-in demo assets. The global main
  process runs the block first (it builds the caches); then the main process of each other node (its
  disk may not be shared); then everyone else, who find the caches built and read them.
- Output files (logs, checkpoints, run record, report, model card, final model) are written where
  ``args.should_save`` / ``is_world_process_zero()`` says so, in the modules that write them.
- ``launch_command``: the ``torchrun`` command line that ``sftrainer train --nproc N`` runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from sftrainer.errors import ConfigError

# Set by torchrun and accelerate launch in every process they start.
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def main_process_first(args: Any, desc: str) -> Iterator[None]:
    """Run the block on the global main process, then each node's main process, then the rest.

    ``args`` is a ``TrainingArguments`` (its ``main_process_first`` sets up the process group). With
    one process this is a plain block.
    """
    with (
        args.main_process_first(local=False, desc=desc),
        args.main_process_first(local=True, desc=desc),
    ):
        yield


def is_launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return any(name in os.environ for name in LAUNCHER_ENV)


def launch_command(
    config: str | None, overrides: Sequence[str], nproc: int, gpus: int | None = None
) -> list[str]:
    """The command that runs ``sftrainer train [config] [overrides]`` in ``nproc`` processes on this machine.

    ``torchrun --standalone`` (``python -m torch.distributed.run``): a rendezvous on a free local port,
    so two runs on one machine do not collide. ``gpus``: the GPUs this machine has (0 or None: the
    processes train on the CPU, over gloo). Raises ``ConfigError`` where it cannot work.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give the number of processes to start, 1 or more")
    if gpus and nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc}: this machine has {gpus} GPU(s), and each process trains on its own; "
            f"use --nproc {gpus} or fewer (gradient_accumulation_steps keeps the effective batch size); "
            "for CPU processes (use_cpu=true) run torchrun yourself"
        )
    if is_launched():
        raise ConfigError(
            f"--nproc {nproc}: this process was already started by torchrun / accelerate launch; "
            "drop --nproc (the launcher sets the number of processes) or run sftrainer without the launcher"
        )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += ["-m", "sftrainer", "train"]
    return command + ([config] if config is not None else []) + list(overrides)
