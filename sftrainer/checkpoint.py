"""Checkpoints: what it takes to stop a run anywhere and continue it exactly.

- A checkpoint is staged in ``tmp-checkpoint-<step>/checkpoint-<step>`` and renamed into place once
  complete (``SFTTrainer._save_checkpoint``), so a crash while saving leaves the previous checkpoint
  as the latest. Transformers' ``Trainer`` writes ``checkpoint-<step>`` in place.
- ``latest_checkpoint`` finds the newest complete ``checkpoint-<step>``, skipping (with a message)
  incomplete ones: left by a crash of a plain ``Trainer`` or copied in part.
- ``write_layout`` / ``check_resume_layout``: each checkpoint records the number of processes and the
  batch sizes it was written with; resuming it at another effective batch is refused (the examples of
  every later step would change), at the same effective batch with another number of processes it
  continues with a warning.

The run directory around the checkpoints (its record, metrics, model card, ...) is ``sftrainer.run``'s.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sftrainer.errors import ConfigError
from sftrainer.run import TRAINER_STATE, write_atomic

logger = logging.getLogger(__name__)

STAGING_PREFIX = f"tmp-{PREFIX_CHECKPOINT_DIR}-"  # not matched by Trainer's `checkpoint-*` glob
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Processes and batch sizes a checkpoint was written with (absent from older checkpoints).
LAYOUT_FILE = "sftrainer_layout.json"
# One of these in a checkpoint holds the weights (full model, PEFT adapter, sharded, FSDP, DeepSpeed).
WEIGHT_PATTERNS = (
    "model*.safetensors",
    "pytorch_model*.bin",
    "adapter_model.*",
    "pytorch_model_fsdp*",
    "global_step*",
)


# ---- atomic save -------------------------------------------------------------------------------


def staging_dir(run_dir: str, step: int) -> str:
    """Where checkpoint ``step`` is written before it is renamed to ``run_dir/checkpoint-<step>``."""
    return os.path.join(run_dir, f"{STAGING_PREFIX}{step}")


def publish(staging: str, run_dir: str, name: str) -> str:
    """Rename the complete ``staging/name`` to ``run_dir/name`` (one ``os.replace``) and remove ``staging``.

    A checkpoint of the same name already there (a rerun into the same output_dir) is moved aside
    first and deleted after, so the window without it is two renames long.
    """
    final, staged = os.path.join(run_dir, name), os.path.join(staging, name)
    old = None
    if os.path.exists(final):
        old = f"{staging}-replaced"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    _fsync_dir(run_dir)
    shutil.rmtree(staging, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- finding checkpoints -----------------------------------------------------------------------


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be resumed from (e.g. 'trainer_state.json is missing'), or None if it can."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    state = path / TRAINER_STATE
    if not state.is_file():
        return f"{TRAINER_STATE} is missing (the save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (ValueError, KeyError, TypeError, OSError):
        return f"{TRAINER_STATE} is unreadable (the save was interrupted)"
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return "it holds no model weights"
    return None


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a (complete) checkpoint was saved at."""
    return int(json.loads((Path(path) / TRAINER_STATE).read_text(encoding="utf-8"))["global_step"])


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-<step>`` in ``output_dir``; incomplete ones are skipped with a warning."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    for leftover in sorted(output_dir.glob(f"{STAGING_PREFIX}*")):
        logger.warning("Ignoring %s: a checkpoint whose save was interrupted", leftover)
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    for _, path in sorted(found, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("Skipping incomplete checkpoint %s: %s", path, problem)
    return None


def resolve_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """The checkpoint directory to resume from: ``True`` means the latest complete one in ``output_dir``."""
    if resume is None or resume is False:
        return None
    if resume is True:
        last = latest_checkpoint(output_dir)
        if last is None:
            raise ConfigError(
                f"resume_from_checkpoint: true, but {output_dir} holds no checkpoint-<step> directory "
                "(checkpoints are written every save_steps with save_strategy: steps)"
            )
        logger.info("Resuming from the latest checkpoint, %s", last)
        return last
    if not os.path.isdir(resume):
        raise ConfigError(f"resume_from_checkpoint: no such checkpoint directory: {resume}")
    problem = checkpoint_problem(resume)
    if problem is not None:
        raise ConfigError(f"resume_from_checkpoint: {resume} cannot be resumed from: {problem}")
    return str(resume)


# ---- the process layout a checkpoint was written with ----------------------------------------


def batch_layout(args: Any) -> dict[str, int]:
    """Processes, per-process batch and accumulation of ``args``, and the effective batch they make."""
    world = int(args.world_size)
    per_device, accumulation = int(args.per_device_train_batch_size), int(args.gradient_accumulation_steps)
    return {
        "world_size": world,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": world * per_device * accumulation,
    }


def write_layout(checkpoint_dir: str | Path, args: Any) -> None:
    """Record ``batch_layout(args)`` in ``checkpoint_dir/LAYOUT_FILE`` (read back on resume)."""
    text = json.dumps(batch_layout(args), indent=2) + "\n"
    write_atomic(Path(checkpoint_dir) / LAYOUT_FILE, text)


def resume_layout_problem(recorded: dict[str, Any], args: Any, name: str) -> tuple[str | None, str | None]:
    """(error, warning) for resuming checkpoint ``name``, written with layout ``recorded``, under ``args``.

    The data order of the steps after a checkpoint is a function of the effective batch: every step
    takes the next effective-batch-sized slice of the (seeded) sample order, whatever the number of
    processes sharing it. Another number of processes at the same effective batch resumes the same
    examples step by step (only per-process random states, such as dropout's, are not restored).
    Another effective batch changes what every step trains on and the steps per epoch: refused unless
    ``allow_batch_change_on_resume``.
    """
    now = batch_layout(args)
    then_world, now_world = recorded.get("world_size"), now["world_size"]
    then_batch, now_batch = recorded.get("effective_batch_size"), now["effective_batch_size"]
    if then_batch is None or then_world is None:
        return None, None
    if then_batch != now_batch:
        message = (
            f"{name} was written by {then_world} process(es) at an effective batch of {then_batch} "
            f"({recorded.get('per_device_train_batch_size')} per process x {then_world} x accumulation "
            f"{recorded.get('gradient_accumulation_steps')}); this run has {now_world} process(es) at "
            f"{now_batch} ({now['per_device_train_batch_size']} x {now_world} x accumulation "
            f"{now['gradient_accumulation_steps']}). Every step after the checkpoint would train on other "
            "examples, and the steps per epoch (and so the learning-rate schedule of an epoch-based run) change"
        )
        if not args.allow_batch_change_on_resume:
            hint = _same_batch_hint(then_batch, now_world, now["gradient_accumulation_steps"])
            return (
                f"resume_from_checkpoint: {message}. {hint}, or set allow_batch_change_on_resume: true "
                "to continue at the new batch anyway",
                None,
            )
        return None, f"{message} (allow_batch_change_on_resume: true)"
    if then_world != now_world:
        return None, (
            f"{name} was written by {then_world} process(es), this run has {now_world}: the effective batch "
            f"({now_batch}) is unchanged, so each step trains on the same examples as it would have; "
            "random states are per process (dropout), and are restored only for the processes the "
            "checkpoint had"
        )
    return None, None


def check_resume_layout(checkpoint_dir: str, args: Any, warn: bool = True) -> None:
    """Refuse (``ConfigError``) or warn about resuming ``checkpoint_dir`` with another process layout.

    Checkpoints written before the layout was recorded (no ``LAYOUT_FILE``) resume unchecked.
    ``warn=False``: only refuse (an early check; the warning comes when training resumes).
    """
    path = Path(checkpoint_dir) / LAYOUT_FILE
    if not path.is_file():
        if warn:
            logger.info("%s records no process layout (an older checkpoint): not checked", checkpoint_dir)
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        logger.warning("Could not read %s (%s): the process layout is not checked", path, err)
        return
    error, warning = resume_layout_problem(recorded, args, Path(checkpoint_dir).name)
    if error:
        raise ConfigError(error)
    if warning and warn and args.should_log:
        logger.warning("Resuming: %s", warning)


def _same_batch_hint(effective: int, world: int, accumulation: int) -> str:
    """How to get ``effective`` back with ``world`` processes, as an instruction."""
    if effective % (world * accumulation) == 0:
        return f"Set per_device_train_batch_size={effective // (world * accumulation)} to keep it"
    return f"Choose per_device_train_batch_size x gradient_accumulation_steps = {effective} / {world}"
