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
from sftrainer.constants import EXPORT_FORMATS
from sftrainer.errors import RunDirError
from sftrainer.model import DTYPES
from sftrainer.run import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CARD_FILE,
    CONFIG_FILE,
    MODEL_CONFIG,
    RESULTS_FILE,
    Run,
    load_run_model,
    model_source,
    read_run,
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
    if dtype not in DTYPES:
        raise RunDirError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = check_out_dir(out_dir)
    model, base_path = load_merged(run, base, trust_remote_code)
    out.mkdir(parents=True, exist_ok=True)
    saved_dtype = _checkpoint_dtype(base_path, trust_remote_code) if dtype == "auto" else DTYPES[dtype]
    if saved_dtype is not None and saved_dtype != torch.float32:
        model = model.to(saved_dtype)
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


@dataclasses.dataclass
class Exported:
    """What ``export`` wrote, and what to tell the user (how to serve it, notes)."""

    files: list[Path]
    message: str


def export(
    run_dir: str | Path,
    out_dir: str | Path,
    fmt: str,
    qtype: str = "f16",
    base: str | None = None,
    name: str | None = None,
) -> Exported:
    """Write the run in ``run_dir`` to ``out_dir`` in format ``fmt`` (``EXPORT_FORMATS``), with a model card
    listing each artefact, the command that made it and the command that serves it.

    'gguf': one GGUF file (``sftrainer.gguf_export``); 'gguf-lora': the base GGUF and the LoRA adapter as
    a GGUF LoRA beside it (``sftrainer.gguf_lora``); 'ollama': the GGUF and a ``Modelfile``
    (``sftrainer.ollama``); 'vllm' / 'sglang': the LoRA adapter as those servers load it, checked first
    (``sftrainer.serve_export``). ``name``: the model's name on the server (default: ``out_dir``'s)."""
    if fmt not in EXPORT_FORMATS:
        raise RunDirError(f"--format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    made_by = f"sftrainer export {run_dir} {out_dir} --format {fmt}"
    if fmt == "gguf-lora":
        return _export_gguf_lora(run_dir, out_dir, qtype, base, made_by)
    if fmt in ("vllm", "sglang"):
        from sftrainer.serve_export import export_for_server

        served = export_for_server(run_dir, out_dir, fmt, name=name, base=base)
        files = sorted(p for p in served.out_dir.iterdir() if p.is_file())
        card = export_card(
            read_run(run_dir), served.out_dir, served.base, made_by, [(ADAPTER_DIR_NAME, served.command)]
        )
        return Exported([*files, card], served.text())
    from sftrainer.gguf_export import check_type, family, write_gguf

    check_type(qtype)
    run = read_run(run_dir)
    out = check_out_dir(out_dir)
    processing_class = load_processing_class(str(run.path), model_path=model_source(run, base))
    if is_processor(processing_class):
        raise RunDirError(f"{run_dir} holds a vision-language model; GGUF export supports text models")
    family(AutoConfig.from_pretrained(model_source(run, base)).model_type)  # refused before any loading
    model, base_path = load_merged(run, base)
    out.mkdir(parents=True, exist_ok=True)
    path = write_gguf(
        model, processing_class, out / f"model-{qtype}.gguf", qtype, name=Path(run_dir).resolve().name
    )
    made_by += f" --type {qtype}"
    serve = f"llama-cli -m {path.name}; llama-server -m {path.name}; lms import {path.name} (LM Studio)"
    artefacts, files, lines = [(path.name, serve)], [path], [f"Serve it: {serve}"]
    if fmt == "ollama":
        from sftrainer.ollama import modelfile_for_run

        text, notes = modelfile_for_run(run_dir, path.name)
        modelfile = out / "Modelfile"
        modelfile.write_text(text, encoding="utf-8")
        ollama_name = name or out.resolve().name
        create = f"ollama create {ollama_name} -f Modelfile && ollama run {ollama_name}"
        artefacts.append(("Modelfile", create))
        files.append(modelfile)
        lines = [f"Serve it: cd {out} && {create}", *(f"Note: {n}" for n in notes)]
    files.append(export_card(run, out, base_path, made_by, artefacts))
    logger.info("Wrote %s (%s) from %s", path, qtype, run_dir)
    return Exported(files, "\n".join(lines))


def _export_gguf_lora(
    run_dir: str | Path, out_dir: str | Path, qtype: str, base: str | None, made_by: str
) -> Exported:
    """'gguf-lora': the run's base, unmerged, as ``base-<qtype>.gguf`` and its LoRA adapter as the GGUF
    LoRA ``adapter-<qtype>.gguf`` that llama.cpp applies to it; every problem refused before writing."""
    from safetensors import safe_open

    from sftrainer.gguf_export import write_gguf
    from sftrainer.gguf_lora import LORA_TYPES, MERGE_HINT, lora_problems, write_lora_gguf
    from sftrainer.model import load_model
    from sftrainer.run import load_adapter

    if qtype not in LORA_TYPES:
        raise RunDirError(f"--format gguf-lora: --type must be one of {list(LORA_TYPES)}, got {qtype!r}")
    run = read_run(run_dir)
    if not run.is_adapter:
        raise RunDirError(
            f"{run_dir} holds a full model ({MODEL_CONFIG}, no {ADAPTER_CONFIG}): there is no LoRA adapter for "
            "--format gguf-lora; use --format gguf"
        )
    out = check_out_dir(out_dir)
    base_path = model_source(run, base)
    processing_class = load_processing_class(str(run.path), model_path=base_path)
    if is_processor(processing_class):
        raise RunDirError(f"{run_dir} holds a vision-language model; GGUF export supports text models")
    weights = run.path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise RunDirError(f"{run_dir}: no {ADAPTER_WEIGHTS}, the adapter's weights")
    with safe_open(str(weights), framework="pt") as f:
        names = list(f.keys())
    adapter = json.loads((run.path / ADAPTER_CONFIG).read_text())
    problems = lora_problems(adapter, names, AutoConfig.from_pretrained(base_path))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise RunDirError(f"{run_dir}: the adapter cannot be written as a GGUF LoRA:\n{listed}\n{MERGE_HINT}")
    _check_full_precision_base(run, base_path, use="writing the base GGUF from")
    model = load_model(base_path, dtype=torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    base_file = write_gguf(model, processing_class, out / f"base-{qtype}.gguf", qtype, name=f"{name} base")
    adapter_file = write_lora_gguf(
        load_adapter(model, run.path), out / f"adapter-{qtype}.gguf", qtype, name=name
    )
    serve = (
        f"llama-cli -m {base_file.name} --lora {adapter_file.name}; "
        f"llama-server -m {base_file.name} --lora {adapter_file.name}"
    )
    artefacts = [(base_file.name, serve), (adapter_file.name, serve)]
    card = export_card(run, out, base_path, f"{made_by} --type {qtype}", artefacts)
    logger.info("Wrote %s and %s (%s) from %s", base_file, adapter_file, qtype, run_dir)
    return Exported([base_file, adapter_file, card], f"Serve it: {serve}")


ADAPTER_DIR_NAME = "adapter (this directory)"


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` where it is new or empty (an export never overwrites); the caller creates it."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunDirError(f"{out_dir} already exists and is not empty; give a new or empty output directory")
    return out


def load_merged(run: Run, base: str | None = None, trust_remote_code: bool = False) -> tuple[Any, str]:
    """(the run's model in float32 with any LoRA adapter merged in, where its weights came from). An
    adapter is merged into the full-precision base, never a quantized one (a QLoRA run included)."""
    base_path = model_source(run, base)
    _check_full_precision_base(run, base_path)
    model = load_run_model(run, base_path, dtype=torch.float32, trust_remote_code=trust_remote_code)
    if run.is_adapter:
        model = model.merge_and_unload()
    model.eval()
    return model, base_path


def _check_full_precision_base(run: Run, base_path: str, use: str = "merging into") -> None:
    """Refuse an adapter run whose base is stored quantized; log that a QLoRA run's adapter goes onto
    the full-precision base. ``use``: what is done with the base, as the messages say it."""
    if run.is_adapter and _is_stored_quantized(base_path):
        raise RunDirError(
            f"the base model {base_path} is stored quantized; {use} dequantized weights loses the "
            "adapter's precision. Give the full-precision base with --base PATH"
        )
    if run.was_quantized:
        logger.info(
            "The run trained on a quantized base (QLoRA); %s the full-precision base weights of %s "
            "instead (loaded unquantized, float32)",
            use,
            base_path,
        )


def export_card(run: Run, out: Path, base_path: str, made_by: str, artefacts: list[tuple[str, str]]) -> Path:
    """The model card of an export in ``out``: the run's card, and each artefact (file, the command that
    serves it) with ``made_by``, the command that made it."""
    config = dict(run.config)
    if run.is_adapter and not config.get("lora"):
        adapter = json.loads((run.path / ADAPTER_CONFIG).read_text())
        config["lora"] = {k: adapter.get(k) for k in ADAPTER_KEYS if adapter.get(k) is not None}
    return write_model_card(
        out,
        base_model=(run.config.get("model") or {}).get("name_or_path") or run.adapter_base or base_path,
        config=config,
        metrics=run.metrics,
        rows=run.card_facts.get("rows") or {},
        kind="export",
        commands=[*_train_commands(run.config_path), made_by],
        artefacts=[(name, made_by, serve) for name, serve in artefacts],
    )


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
    artefacts: list[tuple[str, str, str]] | None = None,
) -> Path:
    """Write ``directory/README.md``: YAML front matter (base_model, library_name, tags), then the base
    model, data, settings, metrics and the commands that reproduce the model. ``kind`` is 'adapter',
    'full', 'merged' or 'export'; ``settings`` are resolved training settings (default: read from
    ``config``); ``artefacts`` (file, the command that made it, the command that serves it): an export's
    files."""
    lora = config.get("lora")
    data = config.get("data") or {}
    settings = settings if settings is not None else {k: config[k] for k in SETTING_KEYS if k in config}
    tags = ["sftrainer", "sft", "lora" if lora else "full-fine-tune"] + (
        ["merged"] if kind == "merged" else ["gguf"] if kind == "export" else []
    )
    front: dict[str, Any] = {
        "base_model": base_model,
        "library_name": {"adapter": "peft", "export": "gguf"}.get(kind, "transformers"),
        "pipeline_tag": "image-text-to-text" if vision else "text-generation",
        "tags": tags,
        "sftrainer": {"rows": {k: v for k, v in rows.items() if v is not None}},
    }
    what = {
        "adapter": "a LoRA adapter (load it on top of the base model)",
        "full": "a fully fine-tuned model",
        "merged": "a LoRA adapter merged into its base: a full model",
        "export": "the model exported for other runtimes (files below)",
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
    if artefacts:
        lines += ["", "## Files", "", "| file | made by | served by |", "|---|---|---|"]
        lines += [f"| `{name}` | `{made}` | `{serve}` |" for name, made, serve in artefacts]
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
