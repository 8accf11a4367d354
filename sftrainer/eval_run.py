"""``evaluate_saved``: evaluate a saved model, LoRA adapter or checkpoint as training evaluates
(``sftrainer eval RUN_DIR_OR_MODEL [DATA] [key=value ...]``).

The settings are the run's own (``sftrainer_config.yaml`` in the run directory, or the one above a
checkpoint), with the command line's ``key=value`` overrides; without a run config, the defaults.
The data is DATA, else the run's eval data (``data.eval``, ``data.eval_split`` or
``data.eval_split_name``). Metrics: ``eval_loss``, ``eval_perplexity``, ``eval_mean_token_accuracy``,
... and the generation metrics when ``exact_match_samples`` or ``generation_prompts`` is set; written
to ``<output>/eval_results.json``, samples to ``<output>/eval_samples/``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sftrainer import builtin
from sftrainer.data import load as data_load
from sftrainer.errors import ConfigError
from sftrainer.run import (
    ADAPTER_CONFIG,
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    MODEL_CONFIG,
    TOKENIZER_CONFIG,
    TRAINER_STATE,
    load_run_model,
    model_source,
    read_run,
)
from sftrainer.run_config import RunConfig, apply_overrides, build_config, read_yaml
from sftrainer.setup import load_processing_class

logger = logging.getLogger(__name__)

# Training-only settings of a saved run that an evaluation must not act on.
TRAINING_ONLY = (
    "eval_strategy",
    "eval_steps",  # left alone, it would turn the eval_strategy back on (config.resolve_intervals)
    "save_strategy",
    "save_steps",
    "load_best_model_at_end",
    "resume_from_checkpoint",
    "overwrite_output_dir",  # an evaluation into the run's directory must not remove its checkpoints
    "push_to_hub",
    "report_to",
)


def evaluate_saved(
    target: str,
    data: str | None = None,
    overrides: Sequence[str] = (),
    output: str | None = None,
    base: str | None = None,
) -> tuple[dict[str, float], Path]:
    """Evaluate ``target`` (a run directory, model directory, adapter directory, checkpoint or
    'builtin'; ``base``: an adapter's base model where its recorded one is not found). Returns the
    metrics and the path of ``eval_results.json``. Raises ``ConfigError``."""
    from sftrainer.trainer import SFTTrainer  # torch / transformers: only once a command runs

    path = Path(builtin.model_path(target))
    if not path.is_dir():
        raise ConfigError(f"no such run, model or checkpoint directory: {target}")
    cfg = _run_config(path, overrides, output or str(path))
    eval_ds = _eval_data(cfg, data, path)
    model, tokenizer = _load(path, cfg, base)
    trainer = SFTTrainer(model=model, args=cfg.train, eval_dataset=eval_ds, processing_class=tokenizer)
    state = path / TRAINER_STATE
    if state.is_file():  # a checkpoint: its samples file is named after the step it was saved at
        trainer.state.global_step = int(json.loads(state.read_text()).get("global_step", 0))
    metrics = trainer.evaluate()
    assert cfg.train.output_dir is not None  # TrainingArguments.__post_init__ defaults it
    out_dir = Path(cfg.train.output_dir)
    results = out_dir / EVAL_RESULTS_FILE
    if trainer.is_world_process_zero():  # once, under torchrun / accelerate launch
        out_dir.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics, results


def _run_config(path: Path, overrides: Sequence[str], output_dir: str) -> RunConfig:
    """The run's configuration (found beside ``path`` or above it), overridden, for evaluation only."""
    found = next((d / CONFIG_FILE for d in (path, path.parent) if (d / CONFIG_FILE).is_file()), None)
    raw = read_yaml(found) if found is not None else {}
    if found is not None:
        logger.info("Settings from %s", found)
    for key in TRAINING_ONLY:
        raw.pop(key, None)
    raw = apply_overrides(raw, overrides)
    raw.update(output_dir=output_dir, report_to="none")
    return build_config(raw, f"{found}: " if found is not None else "")


def _eval_data(cfg: RunConfig, data: str | None, path: Path) -> Any:
    if data == builtin.BUILTIN:
        data = str(builtin.data_files()[1])
    if data is not None:
        if not data_load.is_hub_id(data) and not Path(data).exists():
            raise ConfigError(f"DATA: no such file or directory: {data}")
        return data_load.load(data, f"eval data ({data_load.describe(data)})")
    if not cfg.data.has_eval():
        raise ConfigError(
            f"no eval data: pass DATA (a file), or evaluate a run directory whose {CONFIG_FILE} sets "
            f"data.eval, data.eval_split or data.eval_split_name ({path} has none)"
        )
    from sftrainer.sources import resolve_data

    return resolve_data(cfg)[1]


def _load(path: Path, cfg: RunConfig, base: str | None = None) -> tuple[Any, Any]:
    """Model (with its adapter) and tokenizer: the directory's own tokenizer, else the base model's."""
    adapter = path / ADAPTER_CONFIG
    if adapter.is_file() and not json.loads(adapter.read_text()).get("base_model_name_or_path"):
        raise ConfigError(f"{adapter}: no base_model_name_or_path: cannot tell which model it adapts")
    if not adapter.is_file() and not (path / MODEL_CONFIG).is_file():
        raise ConfigError(f"{path}: not a model directory (no {MODEL_CONFIG} or {ADAPTER_CONFIG})")
    run = read_run(path)
    base = model_source(run, base)
    model = load_run_model(
        run,
        base,
        dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if run.is_adapter:
        logger.info("Evaluating the LoRA adapter %s on %s", path, base)
    else:
        logger.info("Evaluating the model %s", path)
    has_tokenizer = (path / TOKENIZER_CONFIG).is_file()
    source = str(path) if has_tokenizer else base
    # A vision-language base comes with its processor (sftrainer.vision), a text one with its tokenizer.
    return model, load_processing_class(source, cfg.model.trust_remote_code, model_path=base)


def format_metrics(metrics: dict[str, float]) -> str:
    """One metric a line, aligned."""
    width = max((len(k) for k in metrics), default=0)
    return "\n".join(f"  {key:<{width}}  {value:.4f}" for key, value in metrics.items())
