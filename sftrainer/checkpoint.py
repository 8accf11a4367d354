"""Checkpoints and the run's record: what it takes to stop a run anywhere and continue it exactly.

- A checkpoint is staged in ``tmp-checkpoint-<step>/checkpoint-<step>`` and renamed into place once
  complete (``SFTTrainer._save_checkpoint``), so a crash while saving leaves the previous checkpoint
  as the latest. Transformers' ``Trainer`` writes ``checkpoint-<step>`` in place.
- ``latest_checkpoint`` finds the newest complete ``checkpoint-<step>``, skipping (with a message)
  incomplete ones: left by a crash of a plain ``Trainer`` or copied in part.
- ``check_loss``: a NaN or infinite loss stops training (``NonFiniteLossError``) before the optimizer
  applies it; weights that turned NaN / inf anyway are refused at the next save
  (``refuse_nonfinite_weights``), so no checkpoint of a bad state is ever written.
- ``write_run_record``: the resolved config (``sftrainer_config.yaml``, every default filled in, loadable
  by ``sftrainer train``) and the library versions and command line (``run_info.json``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import platform
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from sftrainer.errors import ConfigError, SFTrainerError

logger = logging.getLogger(__name__)

STAGING_PREFIX = f"tmp-{PREFIX_CHECKPOINT_DIR}-"  # not matched by Trainer's `checkpoint-*` glob
CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
TRAINER_STATE = "trainer_state.json"
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


# ---- NaN / inf guard ---------------------------------------------------------------------------


class NonFiniteLossError(SFTrainerError):
    """The training loss became NaN or infinite; training stopped before applying it."""


def check_loss(loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Raise ``NonFiniteLossError`` naming ``step`` (1-based optimizer step) if ``loss`` is NaN or inf.

    Trainer itself (``logging_nan_inf_filter``) replaces such a loss by the running mean in the logs
    and applies its gradients: the weights turn NaN and every later checkpoint with them.
    """
    if torch.isfinite(loss).all():
        return
    value = "nan" if torch.isnan(loss).any() else "inf"
    last = latest_checkpoint(output_dir)
    kept = (
        f"the last checkpoint, {last}, is kept (resume_from_checkpoint: true continues from it)"
        if last
        else "no checkpoint was written before it"
    )
    raise NonFiniteLossError(
        f"the training loss is {value} at step {step}; training stopped before applying it, and {kept}. "
        "Lower learning_rate, set max_grad_norm, or check the data of that step"
    )


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first trainable parameter holding a NaN or inf, or None."""
    for name, param in model.named_parameters():
        if param.requires_grad and not torch.isfinite(param.detach()).all():
            return name
    return None


def refuse_nonfinite_weights(name: str, step: int, output_dir: str) -> None:
    """Raise ``NonFiniteLossError``: the weights at ``step`` hold NaN / inf, so no checkpoint is written."""
    last = latest_checkpoint(output_dir)
    kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint was written before it"
    raise NonFiniteLossError(
        f"the weights hold nan or inf after step {step} (first: {name}); training stopped without saving "
        f"them, and {kept}. Lower learning_rate or set max_grad_norm"
    )


# ---- the run's record ------------------------------------------------------------------------

# Not written to sftrainer_config.yaml: secrets, and resuming (rerunning the config reproduces the
# run from the start; a resumed run ends where the uninterrupted one would).
SKIPPED_KEYS = {"hub_token": "a secret", "resume_from_checkpoint": "a rerun starts from step 0"}
PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "sftrainer")


def resolved_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` (a ``RunConfig``) as the YAML ``sftrainer train`` reads: every key, defaults filled in."""
    from sftrainer.config import init_fields

    out: dict[str, Any] = {}
    for name in init_fields(type(cfg.train)):
        if name not in SKIPPED_KEYS:
            out[name] = _plain(getattr(cfg.train, name))
    out["model"] = _plain(cfg.model)
    out["data"] = _plain(cfg.data)
    out["lora"] = _plain(cfg.lora) if cfg.lora is not None else None
    return out


def _plain(value: Any) -> Any:
    """A YAML-safe copy: enums by value, dataclasses as mappings, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def run_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Library versions, Python, platform and the command line of this process."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": list(sys.argv if argv is None else argv),
        "cwd": os.getcwd(),
        "versions": versions,
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def write_run_record(cfg: Any, output_dir: str | Path) -> None:
    """Write ``sftrainer_config.yaml`` (the resolved config) and ``run_info.json`` to ``output_dir``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    skipped = ", ".join(f"{k} ({why})" for k, why in SKIPPED_KEYS.items())
    header = (
        "# The resolved configuration of this run: every key, defaults filled in.\n"
        f"# `sftrainer train {output_dir / 'sftrainer_config.yaml'} output_dir=NEW_DIR` runs it again.\n"
        f"# Not written: {skipped}.\n"
    )
    body = yaml.safe_dump(resolved_config(cfg), sort_keys=False, allow_unicode=True)
    _write_atomic(output_dir / "sftrainer_config.yaml", header + body)
    _write_atomic(output_dir / "run_info.json", json.dumps(run_info(), indent=2) + "\n")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
