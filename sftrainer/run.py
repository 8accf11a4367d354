"""One home for a finished run: the names of a run directory's files, the run record written when a
run starts, reading a run back, finding an adapter's base, and loading the run's model.

Contract: every module that writes or reads a run directory names its files with the constants
below (never with string literals), and every command that uses a run's model (``merge``,
``generate``, ``chat``, ``eval``) loads it with ``load_run_model``: a full model from the run
directory, or the LoRA adapter on the base ``resolve_base`` finds.

A run directory (``output_dir``), or a ``checkpoint-<step>/`` inside it (``sftrainer.checkpoint``),
holds:

- the model: ``config.json`` + safetensors (a full model) or ``adapter_config.json`` +
  ``adapter_model.safetensors`` (a PEFT adapter), with the tokenizer or processor and chat template;
- ``sftrainer_config.yaml`` (the resolved config, loadable by ``sftrainer train``) and
  ``run_info.json`` (library versions, command line): the run record, ``write_run_record``;
- ``metrics.jsonl`` (one record per log event, ``sftrainer.tracking``), ``all_results.json`` (the
  final metrics), ``eval_results.json`` (``sftrainer eval``);
- ``eval_samples/step-<step>.jsonl`` and ``eval_samples.jsonl`` (the latest evaluation's generation
  samples), ``data_stats.json`` and ``masking_preview.json`` (what the run trained on);
- ``README.md`` (the model card, ``sftrainer.export``), ``report.png`` and ``report.html``
  (``sftrainer.report``), ``runs/<date>_<host>/`` (TensorBoard's event files, transformers' name);
- ``earlier-runs/<n>/``: the records of an earlier run in the same directory (``sftrainer.run_dir``).

Importing this module imports no torch or transformers (``sftrainer report`` reads a run with the
layout names alone); the functions that need them import them where they run.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import platform
import sys
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sftrainer import builtin
from sftrainer.coerce import init_fields
from sftrainer.errors import RunDirError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# ---- the layout of a run directory -------------------------------------------------------------

CONFIG_FILE = "sftrainer_config.yaml"  # the resolved config of the run
RUN_INFO_FILE = "run_info.json"  # library versions, platform and command line
METRICS_FILE = "metrics.jsonl"  # one record per log event
RESULTS_FILE = "all_results.json"  # the final metrics of `train()`
EVAL_RESULTS_FILE = "eval_results.json"  # the metrics of `sftrainer eval`
EVAL_SAMPLES_DIR = "eval_samples"  # eval_samples/step-<step>.jsonl: the samples of each evaluation
EVAL_SAMPLES_FILE = "eval_samples.jsonl"  # the latest evaluation's samples
DATA_STATS, MASKING_PREVIEW = "data_stats.json", "masking_preview.json"  # what the run trained on
CARD_FILE = "README.md"  # the model card
REPORT_PNG, REPORT_HTML = "report.png", "report.html"
EARLIER_RUNS_DIR = "earlier-runs"  # earlier-runs/<n>/: the records set_aside_earlier_run moved
MODEL_CONFIG = "config.json"  # a full model's (or a base model's) config
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter's config
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # its weights (PEFT's SAFETENSORS_WEIGHTS_NAME)
TOKENIZER_CONFIG = "tokenizer_config.json"  # present where a tokenizer was saved
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME: the run's and each checkpoint's
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-<step>/: transformers' PREFIX_CHECKPOINT_DIR, then "-"

# ---- the run record --------------------------------------------------------------------------

# Not written to sftrainer_config.yaml: secrets, resuming (rerunning the config reproduces the run
# from the start; a resumed run ends where the uninterrupted one would), and starting over in a used
# output_dir (`sftrainer eval RUN` reads the config, and a rerun goes to output_dir=NEW_DIR).
SKIPPED_KEYS = {
    "hub_token": "a secret",
    "resume_from_checkpoint": "a rerun starts from step 0",
    "overwrite_output_dir": "it is about this run's directory",
}
PACKAGES = ("torch", "transformers", "peft", "datasets", "accelerate", "sftrainer")


def resolved_config(cfg: Any) -> dict[str, Any]:
    """``cfg`` (a ``RunConfig``) as the YAML ``sftrainer train`` reads: every key, defaults filled in."""
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
    import torch  # only where a run starts

    versions: dict[str, str | None] = {"python": platform.python_version()}
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
        f"# `sftrainer train {output_dir / CONFIG_FILE} output_dir=NEW_DIR` runs it again.\n"
        f"# Not written: {skipped}.\n"
    )
    body = yaml.safe_dump(resolved_config(cfg), sort_keys=False, allow_unicode=True)
    write_atomic(output_dir / CONFIG_FILE, header + body)
    write_atomic(output_dir / RUN_INFO_FILE, json.dumps(run_info(), indent=2) + "\n")


# ---- reading a run ---------------------------------------------------------------------------


@dataclass
class Run:
    """What a run directory holds. ``config`` is the saved run config (YAML as written), if found."""

    path: Path
    is_adapter: bool
    adapter_base: str | None = None  # base_model_name_or_path of adapter_config.json
    config: dict[str, Any] = field(default_factory=dict)
    config_path: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    card_facts: dict[str, Any] = field(default_factory=dict)  # the `sftrainer:` entry of README.md

    @property
    def was_quantized(self) -> bool:
        """Whether the run loaded its base quantized (QLoRA): the ``model:`` section's keys, or TRL's
        ``model_init_kwargs`` spelling."""
        keys = ("quantization_config", "load_in_4bit", "load_in_8bit")
        sections = (self.config.get("model_init_kwargs"), self.config.get("model"))
        return any(isinstance(s, dict) and any(s.get(k) for k in keys) for s in sections)


def read_run(run_dir: str | Path) -> Run:
    """Read a run directory. Raises ``RunDirError`` when it holds neither a model nor an adapter."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    adapter_file, model_file = path / ADAPTER_CONFIG, path / MODEL_CONFIG
    if not adapter_file.is_file() and not model_file.is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory: it holds neither {ADAPTER_CONFIG} (a LoRA adapter) nor "
            f"{MODEL_CONFIG} (a full model). Give the output_dir of `sftrainer train` or one of its "
            f"{CHECKPOINT_PREFIX}<step>"
        )
    run = Run(path=path, is_adapter=adapter_file.is_file())
    if run.is_adapter:
        run.adapter_base = json.loads(adapter_file.read_text()).get("base_model_name_or_path")
    if (path / RESULTS_FILE).is_file():  # not the parent's: a checkpoint is not the final model
        run.metrics = json.loads((path / RESULTS_FILE).read_text())
    # A checkpoint-<step> directory has its run's config and card one level up.
    in_checkpoint = path.name.startswith(CHECKPOINT_PREFIX)
    for where in (path, path.parent) if in_checkpoint else (path,):
        if run.config_path is None and (where / CONFIG_FILE).is_file():
            run.config_path = where / CONFIG_FILE
            run.config = yaml.safe_load(run.config_path.read_text()) or {}
        if not run.card_facts and (where / CARD_FILE).is_file():
            run.card_facts = front_matter(where / CARD_FILE).get("sftrainer") or {}
    return run


def front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (``{}`` where it has none or it does not parse)."""
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1


def resolve_base(run: Run, base: str | None = None) -> str:
    """The base model of an adapter run, as a loadable directory or hub id.

    ``base`` (the user's) wins. Then the adapter's ``base_model_name_or_path`` if it exists ('builtin'
    is the demo model; a relative path is tried from the run directory, then from here), then the run
    config's ``model.name_or_path`` (the adapter records an absolute cache path, which another machine or
    ``$SFTRAINER_HOME`` may lack), then the adapter's name as a hub id.
    """
    if base is not None:
        return builtin.model_path(base)
    names = [run.adapter_base, (run.config.get("model") or {}).get("name_or_path")]
    for name in [n for n in names if n]:
        if builtin.is_builtin(name):
            return builtin.model_path(name)
        for candidate in (Path(name).expanduser(), run.path / name):
            if candidate.is_dir():
                return str(candidate)
    hub_ids = [n for n in names if n and not _looks_like_path(n)]
    if hub_ids:
        return hub_ids[0]
    raise RunDirError(
        f"{run.path}: the adapter's base model {run.adapter_base!r} is not found (looked from here and from "
        "the run directory); give its location with --base PATH"
    )


# ---- loading its model -----------------------------------------------------------------------


def model_source(run: Run, base: str | None = None) -> str:
    """Where the run's weights load from: its base (``resolve_base``) for an adapter, else the run."""
    return resolve_base(run, base) if run.is_adapter else str(run.path)


def load_run_model(
    run: Run,
    base: str | None = None,
    *,
    dtype: str | torch.dtype | None = "auto",
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The model of ``run``: the full model saved in it, or its LoRA adapter (a ``PeftModel``, not
    trainable) on the base ``model_source(run, base)`` finds. A vision-language checkpoint loads as
    one (``sftrainer.model.load_model``); ``dtype`` is the dtype the weights load in ('auto': the
    checkpoint's own). The caller sets eval mode, or merges the adapter."""
    from sftrainer.model import load_model  # torch / transformers: only where a model is loaded

    model = load_model(
        model_source(run, base),
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
    )
    return load_adapter(model, run.path) if run.is_adapter else model


def load_adapter(model: Any, run_dir: str | Path) -> Any:
    """``PeftModel.from_pretrained`` of the adapter in ``run_dir`` on ``model``."""
    from peft import PeftModel  # peft: only where an adapter is loaded

    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.x (as in lora.py).
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return PeftModel.from_pretrained(model, str(run_dir))


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename: never half written."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
