"""A finished run as something to hand on: merge a LoRA adapter into its base (``merge``), and write
the model card (README.md) that every saved run and merged model carries (``run_card``,
``write_model_card``).

Reading the run, finding its base and loading its model are ``sftrainer.run``'s, as for
``generate``, ``chat`` and ``eval``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig

from sftrainer import builtin
from sftrainer.errors import RunDirError
from sftrainer.model import DTYPES
from sftrainer.run import (
    ADAPTER_CONFIG,
    CARD_FILE,
    CONFIG_FILE,
    MODEL_CONFIG,
    RESULTS_FILE,
    load_run_model,
    read_run,
    resolve_base,
)
from sftrainer.setup import load_processing_class
from sftrainer.vision.processor import is_processor

logger = logging.getLogger(__name__)


def _checkpoint_dtype(base: str, trust_remote_code: bool) -> Any:
    """The dtype the base checkpoint is stored in (read before loading it in float32), or None."""
    dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _is_stored_quantized(base: str) -> bool:
    config = Path(base) / MODEL_CONFIG
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))


def merge(
    run_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> Path:
    """Merge the LoRA adapter of ``run_dir`` into its base and save a full model, the tokenizer, the
    run config and a model card to ``out_dir``. The base is loaded in float32 (never quantized, so a
    QLoRA adapter is merged into the full-precision weights); the merged weights are saved in ``dtype``
    ('auto': the base checkpoint's own dtype)."""
    run = read_run(run_dir)
    if not run.is_adapter:
        raise RunDirError(
            f"{run_dir} holds a full model ({MODEL_CONFIG}, no {ADAPTER_CONFIG}): there is no LoRA adapter "
            "to merge; load it as it is with AutoModelForCausalLM.from_pretrained"
        )
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out_dir} already exists and is not empty; give a new or empty output directory")
    if dtype not in DTYPES:
        raise RunDirError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    base_path = resolve_base(run, base)
    if _is_stored_quantized(base_path):
        raise RunDirError(
            f"the base model {base_path} is stored quantized; merging into dequantized weights loses the "
            "adapter's precision. Give the full-precision base with --base PATH"
        )
    if run.was_quantized:
        logger.info(
            "The run trained on a quantized base (QLoRA); merging into the full-precision base weights "
            "of %s instead (loaded unquantized, float32)",
            base_path,
        )
    saved_dtype = _checkpoint_dtype(base_path, trust_remote_code) if dtype == "auto" else DTYPES[dtype]
    model = load_run_model(run, base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = model.merge_and_unload()
    if saved_dtype is not None and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processing_class = load_processing_class(str(run.path), trust_remote_code, model_path=base_path)
    processing_class.save_pretrained(out)  # a vision-language base: the run holds its processor
    if run.config_path is not None:
        shutil.copyfile(run.config_path, out / CONFIG_FILE)
    if run.metrics:
        (out / RESULTS_FILE).write_text(json.dumps(run.metrics, indent=2) + "\n")
    adapter = json.loads((run.path / ADAPTER_CONFIG).read_text())
    lora = run.config.get("lora") or {k: adapter.get(k) for k in ADAPTER_KEYS if adapter.get(k) is not None}
    write_model_card(
        out,
        base_model=(run.config.get("model") or {}).get("name_or_path") or run.adapter_base or base_path,
        config={**run.config, "lora": lora},
        metrics=run.metrics,
        rows=run.card_facts.get("rows") or {},
        kind="merged",
        commands=[*_train_commands(run.config_path), f"sftrainer merge {run_dir} {out_dir}"],
        vision=is_processor(processing_class),
    )
    logger.info("Merged the adapter of %s into %s; saved the full model to %s", run_dir, base_path, out)
    return out


# ---- model card ---------------------------------------------------------------------------

ADAPTER_KEYS = (
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_dora",
    "use_rslora",
    "modules_to_save",
    "trainable_token_indices",
)
SETTING_KEYS = (
    "max_length", "num_train_epochs", "max_steps", "per_device_train_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "warmup_ratio",
    "weight_decay", "train_on", "packing", "padding_free", "bf16", "fp16", "seed",
)  # fmt: skip


def _train_commands(config_path: Path | None) -> list[str]:
    if config_path is None:
        return []
    return [f"sftrainer train {config_path}   # the run's config with every override, saved with it"]


def invocation() -> str | None:
    """The `sftrainer train ...` command line of this process, when it came from the CLI."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog in ("sftrainer", "__main__.py") and sys.argv[1:2] == ["train"]:
        return " ".join(["sftrainer", *sys.argv[1:]])
    return None


def write_model_card(
    directory: str | Path,
    *,
    base_model: str,
    config: dict[str, Any],
    metrics: dict[str, Any],
    rows: dict[str, int | None],
    kind: str,
    commands: list[str],
    settings: dict[str, Any] | None = None,
    vision: bool = False,
) -> Path:
    """Write ``directory/README.md``: YAML front matter (base_model, library_name, tags), then the base
    model, data, settings, metrics and the commands that reproduce the model. ``kind`` is 'adapter',
    'full' or 'merged'; ``settings`` are resolved training settings (default: read from ``config``)."""
    lora = config.get("lora")
    data = config.get("data") or {}
    settings = settings if settings is not None else {k: config[k] for k in SETTING_KEYS if k in config}
    tags = ["sftrainer", "sft", "lora" if lora else "full-fine-tune"] + (
        ["merged"] if kind == "merged" else []
    )
    front: dict[str, Any] = {
        "base_model": base_model,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": tags,
        "sftrainer": {"rows": {k: v for k, v in rows.items() if v is not None}},
    }
    what = {
        "adapter": "a LoRA adapter (load it on top of the base model)",
        "full": "a fully fine-tuned model",
        "merged": "a LoRA adapter merged into its base: a full model",
    }[kind]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {Path(directory).resolve().name}",
        "",
        f"Supervised fine-tune made with sftrainer: {what}.",
        "",
        "## Base model",
        "",
        f"`{base_model}`" + (" (sftrainer's built-in demo model)" if base_model == builtin.BUILTIN else ""),
        "",
        "## Data",
        "",
    ]
    if not config:
        lines.append(f"Not recorded (no {CONFIG_FILE} was found with the run).")
    for split in ("train", "eval") if config else ():
        source = data.get(split, builtin.BUILTIN if split == "train" else None)
        if source is None and split == "eval" and data.get("eval_split"):
            source = f"{data['eval_split']:.0%} of the train data"
        if source is None:
            continue
        count = rows.get(split)
        lines.append(f"- {split}: `{source}`" + (f" ({count:,} rows)" if count is not None else ""))
    if data.get("columns"):
        lines.append(f"- columns renamed: `{data['columns']}`")
    lines += ["", "## Settings", ""]
    if lora:
        lora_text = ", ".join(f"{k}={v}" for k, v in lora.items())
        lines.append(f"- method: LoRA ({lora_text})" if lora_text else "- method: LoRA (defaults)")
    else:
        lines.append("- method: full fine-tuning")
    model_section = {k: v for k, v in (config.get("model") or {}).items() if k != "name_or_path"}
    if model_section:
        lines.append(f"- model: {', '.join(f'{k}={v}' for k, v in model_section.items())}")
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No metrics were recorded.")
    lines += ["", "## Reproduce", "", "```bash", *commands, "```", ""]
    if kind == "merged" and vision:
        lines += [
            "Load it with `AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`;",
            "prompt it with the processor's chat template (`sftrainer generate --image` / `sftrainer chat` do).",
            "",
        ]
    elif kind == "merged":
        lines += [
            "Load it with `AutoModelForCausalLM.from_pretrained`; prompt it with the chat template of its",
            "tokenizer (`sftrainer generate` / `sftrainer chat` do).",
            "",
        ]
    path = Path(directory) / CARD_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def run_card(cfg: Any, metrics: dict[str, Any], rows: dict[str, int | None], vision: bool = False) -> Path:
    """The model card of a finished ``train(cfg)`` run, written to its output_dir (``vision``: a
    vision-language model, tagged image-text-to-text)."""
    args = cfg.train
    settings = {k: getattr(args, k) for k in SETTING_KEYS if hasattr(args, k)}
    settings = {k: getattr(v, "value", v) for k, v in settings.items()}
    if args.max_steps is not None and args.max_steps > 0:
        settings.pop("num_train_epochs", None)
    else:
        settings.pop("max_steps", None)
    commands = _train_commands(Path(args.output_dir) / CONFIG_FILE)
    if invocation():
        commands.insert(0, f"{invocation()}   # as it was run")
    config = {**cfg.source, "lora": dataclasses.asdict(cfg.lora) if cfg.lora is not None else None}
    return write_model_card(
        args.output_dir,
        base_model=cfg.model.name_or_path,
        config=config,
        metrics=metrics,
        rows=rows,
        kind="adapter" if cfg.lora is not None else "full",
        commands=commands,
        settings=settings,
        vision=vision,
    )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
