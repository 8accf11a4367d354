"""``output_dir`` as the home of one training run: what an earlier run left there, and what a new one
does about it.

A run writes ``checkpoint-<step>/`` (staged in ``tmp-checkpoint-<step>/``), ``metrics.jsonl`` (one record
per log event), ``eval_samples/`` and ``eval_samples.jsonl`` beside the model. A run from step 0 in a
directory that holds another run's checkpoints or training records would mix the two: ``metrics.jsonl``
would go on at step 1 after the earlier run's last step (the report draws both as one curve), and
``resume_from_checkpoint: true`` and ``save_total_limit`` would choose among both runs' checkpoints.

- ``earlier_run``: what of an earlier training run ``output_dir`` holds. Files that are no run's (data,
  notes) and a ``metrics.jsonl`` of evaluations only do not count.
- ``check_output_dir`` / ``refuse_earlier_run``: ``RunDirError`` naming the directory, what it holds
  and the ways out: resume it, ``overwrite_output_dir: true``, or another ``output_dir``. The check of
  transformers' example scripts ("Output directory already exists and is not empty. Use
  --overwrite_output_dir"), which transformers 5 dropped with ``TrainingArguments.overwrite_output_dir``.
- ``set_aside_earlier_run``: what ``SFTTrainer.train()`` does instead of refusing (the Python API is a
  drop-in for TRL's, and ``transformers.Trainer`` trains into a used directory; the seed example trains
  twice into one): the earlier run's ``metrics.jsonl`` and generation samples move to
  ``earlier-runs/<n>/``, so the two runs are never drawn as one, with a warning; checkpoints stay.
- ``clear_earlier_run``: what ``overwrite_output_dir: true`` removes (the earlier run's checkpoints,
  ``metrics.jsonl`` and generation samples), said in the log; other files stay, and those the new run
  writes (the model, the report) replace the old ones.
- ``resume_hint``: after an interruption, the last complete checkpoint and the command that resumes it.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sftrainer.checkpoint import CHECKPOINT_RE, STAGING_PREFIX, latest_checkpoint
from sftrainer.errors import RunDirError
from sftrainer.run import EARLIER_RUNS_DIR, EVAL_SAMPLES_DIR, EVAL_SAMPLES_FILE, METRICS_FILE

logger = logging.getLogger(__name__)

TRAINING_KEYS = ("loss", "train_loss")  # a metrics.jsonl record holding one of these logs training
RESUME_KEY, OVERWRITE_KEY = "resume_from_checkpoint", "overwrite_output_dir"


@dataclass(frozen=True)
class EarlierRun:
    """What an earlier training run left in ``output_dir``; false when it left nothing."""

    output_dir: Path
    checkpoints: tuple[str, ...]  # checkpoint-<step> and tmp-checkpoint-<step> names, by step
    logged_step: int | None  # the last training step metrics.jsonl records (None: it records none)

    def __bool__(self) -> bool:
        return bool(self.checkpoints) or self.logged_step is not None

    def describe(self) -> str:
        parts = []
        if self.checkpoints:
            names = self.checkpoints
            parts.append(
                ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]} ({len(names)})"
            )
        if self.logged_step is not None:
            parts.append(f"{METRICS_FILE} logging training up to step {self.logged_step}")
        return "; ".join(parts)


def earlier_run(output_dir: str | Path) -> EarlierRun:
    """The checkpoints and training records of an earlier run in ``output_dir`` (see the module docstring)."""
    output_dir = Path(output_dir)
    found: list[tuple[int, str]] = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_RE.match(path.name.removeprefix("tmp-"))
            if match and path.is_dir():
                found.append((int(match.group(1)), path.name))
    return EarlierRun(output_dir, tuple(name for _, name in sorted(found)), _last_training_step(output_dir))


def _last_training_step(output_dir: Path) -> int | None:
    path = output_dir / METRICS_FILE
    if not path.is_file():
        return None
    last = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue
            if isinstance(record, dict) and any(k in record for k in TRAINING_KEYS):
                step = record.get("step")
                last = max(last or 0, step if isinstance(step, int) else 0)
    return last


def check_output_dir(output_dir: str | Path, overwrite: bool) -> EarlierRun:
    """What of an earlier run ``output_dir`` holds, for a run from step 0; refused (``RunDirError``)
    where there is something and not ``overwrite``."""
    earlier = earlier_run(output_dir)
    if earlier and not overwrite:
        refuse_earlier_run(earlier)
    return earlier


def refuse_earlier_run(earlier: EarlierRun) -> None:
    """Raise ``RunDirError``: ``earlier.output_dir`` holds ``earlier``, which a run from step 0 would mix with."""
    resumable = latest_checkpoint(earlier.output_dir)
    if resumable is not None:
        resume = (
            f"To continue that run from {Path(resumable).name}, set {RESUME_KEY}=true "
            f"(trainer.train({RESUME_KEY}=True) in Python); to start over"
        )
    else:
        resume = "It has no complete checkpoint to resume from. To start over"
    mixed = (
        f" ({METRICS_FILE} would go on at step 1 after step {earlier.logged_step}, and the report draw both "
        "runs as one curve)"
        if earlier.logged_step is not None
        else ""
    )
    raise RunDirError(
        f"output_dir {earlier.output_dir} already holds a training run ({earlier.describe()}); a new run "
        f"from step 0 would mix with it{mixed}. {resume} in that directory, set {OVERWRITE_KEY}=true "
        f"(it removes the earlier run's checkpoints, {METRICS_FILE} and eval samples); or choose another "
        "output_dir"
    )


def set_aside_earlier_run(earlier: EarlierRun) -> Path | None:
    """Move the records of ``earlier`` (``metrics.jsonl``, generation samples) to ``earlier-runs/<n>/``
    of its ``output_dir`` and say so; its checkpoints stay where transformers reads them. Returns the
    folder the records went to (None where there were none)."""
    output_dir = earlier.output_dir
    records = [output_dir / name for name in (METRICS_FILE, EVAL_SAMPLES_DIR, EVAL_SAMPLES_FILE)]
    records = [path for path in records if path.exists()]
    target = None
    if records:
        n = 1
        while (output_dir / EARLIER_RUNS_DIR / str(n)).exists():
            n += 1
        target = output_dir / EARLIER_RUNS_DIR / str(n)
        target.mkdir(parents=True)
        for path in records:
            path.rename(target / path.name)
    moved = f"; its records ({', '.join(p.name for p in records)}) moved to {target}" if target else ""
    kept = f"; its checkpoints ({', '.join(earlier.checkpoints)}) stay" if earlier.checkpoints else ""
    logger.warning(
        "output_dir %s already holds a training run (%s): this run starts from step 0 beside it, as "
        "transformers' Trainer does%s%s. To continue that run instead, pass %s=True to train(); "
        "overwrite_output_dir=True removes it first. (sftrainer train refuses such a directory.)",
        output_dir,
        earlier.describe(),
        moved,
        kept,
        RESUME_KEY,
    )
    return target


def clear_earlier_run(output_dir: str | Path) -> list[str]:
    """Remove the checkpoints, ``metrics.jsonl`` and generation samples of an earlier run from
    ``output_dir`` (``overwrite_output_dir``), say so, and return what was removed."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    removed = []
    for path in sorted(output_dir.iterdir()):
        ours = (
            CHECKPOINT_RE.match(path.name)
            or path.name.startswith(STAGING_PREFIX)
            or path.name in (METRICS_FILE, EVAL_SAMPLES_DIR, EVAL_SAMPLES_FILE)
        )
        if not ours:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name + ("/" if path.name == EVAL_SAMPLES_DIR else ""))
    if removed:
        logger.warning(
            "%s: removed the earlier run's %s from %s (its other files stay; this run replaces those it "
            "writes)",
            OVERWRITE_KEY,
            ", ".join(removed),
            output_dir,
        )
    return removed


def resume_hint(output_dir: str | Path, command: Sequence[str] | None, overwrite: bool = False) -> str:
    """What to do after an interrupted run: the last complete checkpoint in ``output_dir`` and the command
    that resumes from it, or that there is none and how to start over.

    ``command``: the ``sftrainer train`` command line as run (None: unknown, e.g. in a process started
    by a launcher). The resume command is ``command`` with ``resume_from_checkpoint=true`` in place of any
    ``resume_from_checkpoint`` / ``overwrite_output_dir`` override it had; ``overwrite``: the run's config
    sets ``overwrite_output_dir``, which resuming turns off.
    """
    last = latest_checkpoint(output_dir)

    def command_with(*extra: str) -> str:
        if command is None:
            return f"  the same command with {' '.join(extra)}"
        kept = [arg for arg in command if not arg.startswith((f"{RESUME_KEY}=", f"{OVERWRITE_KEY}="))]
        return f"  {shlex.join([*kept, *extra])}"

    if last is None:
        if earlier_run(output_dir).logged_step is None:
            return f"No checkpoint was saved in {output_dir} yet: running the command again starts over."
        restart = command_with(f"{OVERWRITE_KEY}=true")
        return f"No checkpoint was saved in {output_dir} yet. To start over there:\n{restart}"
    resume = [f"{RESUME_KEY}=true", *([f"{OVERWRITE_KEY}=false"] if overwrite else [])]
    return f"The last complete checkpoint is {last}. To resume from it:\n{command_with(*resume)}"
