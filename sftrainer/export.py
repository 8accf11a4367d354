"""A finished run as something to use: read a run directory, merge a LoRA adapter into its base, and
write the model card (README.md) that every saved run and merged model carries.

A run directory is what ``train()`` writes (or a ``checkpoint-<step>`` inside it): a full model
(``config.json`` + safetensors) or a PEFT adapter (``adapter_config.json``), the tokenizer with its
chat template, ``all_results.json`` and ``sftrainer_config.yaml`` (a checkpoint's is one level up).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sftrainer import builtin
from sftrainer.errors import RunDirError

logger = logging.getLogger(__name__)

CONFIG_FILE = "sftrainer_config.yaml"
RESULTS_FILE = "all_results.json"
CARD_FILE = "README.md"


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
    adapter_file, model_file = path / "adapter_config.json", path / "config.json"
    if not adapter_file.is_file() and not model_file.is_file():
        raise RunDirError(
            f"{run_dir} is not a run directory: it holds neither adapter_config.json (a LoRA adapter) nor "
            "config.json (a full model). Give the output_dir of `sftrainer train` or one of its checkpoint-<step>"
        )
    run = Run(path=path, is_adapter=adapter_file.is_file())
    if run.is_adapter:
        run.adapter_base = json.loads(adapter_file.read_text()).get("base_model_name_or_path")
    if (path / RESULTS_FILE).is_file():  # not the parent's: a checkpoint is not the final model
        run.metrics = json.loads((path / RESULTS_FILE).read_text())
    # A checkpoint-<step> directory has its run's config and card one level up.
    for where in (path, path.parent) if path.name.startswith("checkpoint-") else (path,):
        if run.config_path is None and (where / CONFIG_FILE).is_file():
            run.config_path = where / CONFIG_FILE
            run.config = yaml.safe_load(run.config_path.read_text()) or {}
        if not run.card_facts and (where / CARD_FILE).is_file():
            run.card_facts = _front_matter(where / CARD_FILE).get("sftrainer") or {}
    return run


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


def load_adapter(model: Any, run_dir: str | Path) -> Any:
    """``PeftModel.from_pretrained`` of the adapter in ``run_dir`` on ``model``."""
    import warnings

    from peft import PeftModel

    with warnings.catch_warnings():
        # peft 0.21 reads `model.is_gradient_checkpointing`, deprecated in transformers 5.x (as in lora.py).
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        return PeftModel.from_pretrained(model, str(run_dir))


def _checkpoint_dtype(base: str, trust_remote_code: bool) -> Any:
    """The dtype the base checkpoint is stored in (read before loading it in float32), or None."""
    import torch
    from transformers import AutoConfig

    dtype = getattr(AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code), "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _is_stored_quantized(base: str) -> bool:
    config = Path(base) / "config.json"
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
    import torch

    from sftrainer.model import DTYPES, is_vision_checkpoint, load_model, load_processor, load_tokenizer

    run = read_run(run_dir)
    if not run.is_adapter:
        raise RunDirError(
            f"{run_dir} holds a full model (config.json, no adapter_config.json): there is no LoRA adapter "
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
    model = load_model(base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = load_adapter(model, run.path).merge_and_unload()
    if saved_dtype is not None and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    vlm = is_vision_checkpoint(base_path, trust_remote_code)  # then the run holds its processor
    (load_processor if vlm else load_tokenizer)(str(run.path), trust_remote_code).save_pretrained(out)
    if run.config_path is not None:
        shutil.copyfile(run.config_path, out / CONFIG_FILE)
    if run.metrics:
        (out / RESULTS_FILE).write_text(json.dumps(run.metrics, indent=2) + "\n")
    adapter = json.loads((run.path / "adapter_config.json").read_text())
    lora = run.config.get("lora") or {k: adapter.get(k) for k in ADAPTER_KEYS if adapter.get(k) is not None}
    write_model_card(
        out,
        base_model=(run.config.get("model") or {}).get("name_or_path") or run.adapter_base or base_path,
        config={**run.config, "lora": lora},
        metrics=run.metrics,
        rows=run.card_facts.get("rows") or {},
        kind="merged",
        commands=[*_train_commands(run.config_path), f"sftrainer merge {run_dir} {out_dir}"],
        vision=vlm,
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


def _front_matter(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
