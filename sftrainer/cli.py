"""The ``sftrainer`` command. Each subcommand parses its arguments and calls one library function."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from sftrainer.constants import EXPORT_FORMATS, FIRST_ROWS, GGUF_TYPES
from sftrainer.errors import ConfigError, SFTrainerError
from sftrainer.version import __version__

TRAIN_HELP = """\
Fine-tune a causal language model.

With no CONFIG, fine-tunes the built-in tiny model on the built-in tasks (a CPU demo of a few
minutes) and reports eval loss and exact-match accuracy before and after training.

CONFIG is a YAML file: its top-level keys are SFTConfig fields and the sections model:, data:,
lora:, all listed below (the SFT keys, then every transformers TrainingArguments key by group). Any key can be overridden
after it as key=value, nested keys with dots. Unknown keys stop the run before any work.
"""

TRAIN_EXAMPLES = """\
examples:
  sftrainer train                                   # the built-in demo
  sftrainer train output_dir=/tmp/demo num_train_epochs=1
  sftrainer train configs/builtin-lora.yaml lora.r=32 learning_rate=1e-3
  sftrainer train CONFIG.yaml --nproc 4                # 4 processes (GPUs) on this machine, via torchrun
  sftrainer train configs/fsdp2.yaml --nproc 8         # FSDP2 across 8 GPUs (configs/zero3.yaml: DeepSpeed)
  sftrainer train CONFIG.yaml --accelerate-config acc.yaml   # through accelerate launch --config_file
"""


EVAL_HELP = """\
Evaluate a saved model the way training evaluates: eval loss, perplexity, mean token accuracy and,
with exact_match_samples=N or generation_prompts, generation metrics (exact / normalised match).

RUN_DIR_OR_MODEL: a run's output directory, a model or LoRA adapter directory, a checkpoint-<step>
directory, or 'builtin'. DATA: a data file (any format train reads; 'builtin': the demo eval
set); default: the run's eval data from sftrainer_config.yaml. key=value overrides the run's settings.
Writes eval_results.json (and eval_samples/) to --output, default RUN_DIR_OR_MODEL.

examples:
  sftrainer eval outputs/demo
  sftrainer eval outputs/run/checkpoint-500 data/test.jsonl exact_match_samples=100
"""

DATA_HELP = """\
See the data before training on it: the detected format and column mapping, row counts (read, kept,
truncated, dropped and why), a token-length histogram, the first rows as rendered with the trained
tokens marked (green on a terminal; elsewhere between ⟦ and ⟧), the chat template and where it
came from, and the pre-flight check: trained tokens, optimizer steps, time per epoch (--probe
measures it), estimated peak memory, and warnings for likely mistakes.

CONFIG.yaml and key=value are read as `sftrainer train` reads them (no CONFIG: the built-in demo).
Or give a data file, directory or hub id and --model (a model directory, hub id or 'builtin'): only
its tokenizer and config are read, unless --probe.
"""

DATA_EXAMPLES = """\
examples:
  sftrainer data                                    # the built-in demo's data
  sftrainer data configs/builtin-lora.yaml --rows 5 --plot lengths.png
  sftrainer data data/train.jsonl --model path/to/model max_length=2048
  sftrainer data my.yaml --probe                    # also time 3 training steps on this machine
"""

MAIN_EPILOG = """\
examples:
  sftrainer train                                   # no CONFIG: the built-in demo (tiny model, CPU, minutes)
  sftrainer data CONFIG.yaml                        # what the run would train on, and pre-flight checks
  sftrainer train CONFIG.yaml                       # a run described by one YAML file (see configs/)
  sftrainer train CONFIG.yaml lora.r=32 max_steps=100   # any key=value after it overrides the file
  sftrainer report outputs/demo                     # report.html + report.png of a run

`sftrainer train --help` lists every key.
"""


def _keys_help() -> str:
    from sftrainer.config_help import keys_help

    return keys_help()


def _parser(with_keys: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sftrainer",
        description="Supervised fine-tuning of causal language models (full, LoRA/DoRA) from one YAML file.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the built-in CPU demo)",
        usage="%(prog)s [-h] [--nproc N] [--accelerate-config FILE] [CONFIG.yaml] [key=value ...]",
        description=TRAIN_HELP,
        epilog=TRAIN_EXAMPLES + ("\n" + _keys_help() if with_keys else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    train.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="train in N processes on this machine (one per GPU; CPU processes with use_cpu=true): runs "
        "torchrun --standalone --nproc_per_node=N -m sftrainer train ...; for several machines use "
        "torchrun or accelerate launch directly (README: Multi-GPU and multi-node)",
    )
    train.add_argument(
        "--accelerate-config",
        metavar="FILE",
        help="launch through accelerate launch --config_file FILE (its num_processes, unless --nproc) "
        "instead of torchrun",
    )
    data = sub.add_parser(
        "data",
        help="preview the data as it will be trained, with pre-flight checks (steps, time, memory)",
        usage="%(prog)s [-h] [CONFIG.yaml | DATA --model M] [key=value ...] [options]",
        description=DATA_HELP,
        epilog=DATA_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument("items", nargs="*", metavar="[CONFIG.yaml | DATA] [key=value ...]")
    data.add_argument(
        "--model", help="model directory, hub id or 'builtin' (its tokenizer and chat template)"
    )
    data.add_argument(
        "--rows",
        type=int,
        default=FIRST_ROWS,
        metavar="N",
        help=f"rendered rows to show (default {FIRST_ROWS})",
    )
    data.add_argument("--plot", metavar="FILE", help="also write the token-length histogram as a PNG")
    data.add_argument(
        "--probe", action="store_true", help="load the model and time a few training steps on this machine"
    )
    data.add_argument("--template", action="store_true", help="print the chat template in use")
    evaluate = sub.add_parser(
        "eval",
        help="evaluate a saved model, LoRA adapter or checkpoint (loss, perplexity, generation metrics)",
        usage="%(prog)s [-h] [--output DIR] RUN_DIR_OR_MODEL [DATA] [key=value ...]",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("target", metavar="RUN_DIR_OR_MODEL")
    evaluate.add_argument("items", nargs="*", metavar="[DATA] [key=value ...]")
    evaluate.add_argument("--output", metavar="DIR", help="where eval_results.json goes (default: RUN_DIR)")
    evaluate.add_argument("--base", help="the base model of an adapter, when its recorded base is not found")

    report = sub.add_parser(
        "report",
        help="write report.png and report.html for a run directory",
        description="Write RUN_DIR/report.png (loss and learning rate curves) and RUN_DIR/report.html "
        "(config, data statistics, masking preview, metric curves, generation samples; one file). "
        "train writes them at the end of each run; this rewrites them, e.g. during a run.",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="the output_dir of a run")
    _add_use_parsers(sub)
    return parser


def _add_use_parsers(sub: argparse._SubParsersAction) -> None:
    """merge / generate / chat: use a finished run (sftrainer.export, sftrainer.generate)."""
    merge = sub.add_parser(
        "merge",
        help="merge a LoRA run into its base: a full model for AutoModelForCausalLM",
        description="Merge the LoRA adapter of RUN_DIR into its full-precision base model and save the "
        "full model, tokenizer and a model card to OUT_DIR.",
    )
    merge.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of a LoRA run, or a checkpoint-<step>")
    merge.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) directory for the merged model")
    merge.add_argument("--base", help="the base model, when the adapter's recorded base is not found")
    merge.add_argument(
        "--dtype", default="auto", help="dtype to save: auto (the base's), float32, bfloat16, float16"
    )
    export = sub.add_parser(
        "export",
        help="write a run for another runtime: GGUF (llama.cpp, LM Studio), Ollama, a vLLM / SGLang adapter",
        description="Write RUN_DIR to OUT_DIR in a format another runtime loads, with the chat template and "
        "stop tokens training used, and a model card listing each file with the command that serves it. "
        "gguf / ollama: the model (a LoRA adapter merged into its full-precision base first) as one GGUF "
        "file, for ollama with a Modelfile; gguf-lora: the base model (unmerged) as a GGUF and the LoRA "
        "adapter as a GGUF LoRA beside it (llama-cli -m base-f16.gguf --lora adapter-f16.gguf); vllm / "
        "sglang: the LoRA adapter, checked first against what that server loads, and the command that "
        "serves it.",
    )
    export.add_argument("run_dir", metavar="RUN_DIR", help="output_dir of a run, or a checkpoint-<step>")
    export.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) directory for the exported files")
    export.add_argument(
        "--format",
        required=True,
        choices=EXPORT_FORMATS,
        help="gguf: one GGUF file (llama.cpp, LM Studio); gguf-lora: base GGUF + GGUF LoRA adapter (llama.cpp "
        "--lora); ollama: GGUF + Modelfile; vllm / sglang: the LoRA adapter and the server command",
    )
    export.add_argument(
        "--type",
        default="f16",
        choices=GGUF_TYPES,
        help="GGUF weight type (default: f16; gguf-lora: f16 or bf16)",
    )
    export.add_argument("--base", help="the base model, when the adapter's recorded base is not found")
    export.add_argument(
        "--name", help="the model's name in ollama / the adapter's on the server (default: OUT_DIR's)"
    )
    for name, help_text in (
        ("generate", "answer one prompt with a trained run (its chat template, greedy by default)"),
        ("chat", "chat with a trained run in the terminal (multi-turn, streaming)"),
    ):
        use = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        use.add_argument(
            "run_dir", metavar="RUN_DIR", help="output_dir of a run, a checkpoint-<step> or a merged model"
        )
        if name == "generate":
            use.add_argument("--prompt", required=True, help="the user message")
        use.add_argument(
            "--image",
            action="append",
            default=[],
            metavar="PATH",
            help="an image for a vision-language model (repeat for several), before the "
            + ("prompt" if name == "generate" else "first message; /image PATH attaches one to the next"),
        )
        use.add_argument("--system", help="a system prompt")
        use.add_argument("--max-new-tokens", type=int, default=256)
        use.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
        use.add_argument("--base", help="the base model of an adapter, when its recorded base is not found")


def _version() -> str:
    return __version__


def _setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("SFTRAINER_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(
    items: Sequence[str],
    nproc: int | None = None,
    accelerate_config: str | None = None,
    argv: Sequence[str] = (),
) -> int:
    """``argv``: the command's arguments as given (after the program), for the resume command printed
    when the run is interrupted (Ctrl-C)."""
    config = items[0] if items and "=" not in items[0] else None
    overrides = list(items[1:] if config else items)
    if (nproc is not None and nproc != 1) or accelerate_config is not None:
        from sftrainer.launch import prepare_launch

        command = prepare_launch(config, overrides, nproc, accelerate_config)
        print(f"sftrainer: running {shlex.join(command)}", file=sys.stderr)
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            print(
                f"sftrainer: error: the training processes failed (exit code {code}); the launcher's "
                "report above names the rank that failed first (Root Cause)",
                file=sys.stderr,
            )
        return code

    import sftrainer.builtin as builtin
    from sftrainer.run_config import load_config
    from sftrainer.run_dir import resume_hint
    from sftrainer.train import train

    cfg = load_config(config, overrides, defaults=builtin.DEMO_CONFIG if config is None else None)
    assert cfg.train.output_dir is not None  # TrainingArguments.__post_init__ defaults it
    try:
        metrics = train(cfg)
    except KeyboardInterrupt:
        if cfg.train.process_index == 0:  # once, under torchrun / accelerate launch
            # A process of a launched job does not know the command that started the launcher.
            resume_command = None if _rank_label() else [*_program(), *argv]
            hint = resume_hint(cfg.train.output_dir, resume_command, cfg.train.overwrite_output_dir)
            print(f"sftrainer: interrupted\n{hint}", file=sys.stderr)
        return 130
    if cfg.train.process_index == 0:  # once, under torchrun / accelerate launch
        print(_summary(metrics, cfg.train.output_dir))
    return 0


def _program() -> list[str]:
    """How this process was started, as typed: ``python -m sftrainer`` (with any interpreter options),
    the ``sftrainer`` script (by name where that name finds it), or ``sftrainer`` (main() called from
    Python)."""
    typed = list(getattr(sys, "orig_argv", []))
    for i, arg in enumerate(typed[:-1]):
        if arg == "-m" and typed[i + 1] == "sftrainer":
            return typed[: i + 2]
    script = sys.argv[0] if sys.argv else ""
    if os.path.basename(script) != "sftrainer":
        return ["sftrainer"]
    found = shutil.which("sftrainer")
    same = found is not None and os.path.realpath(found) == os.path.realpath(script)
    return ["sftrainer" if same else script]


def cmd_data(args: argparse.Namespace) -> int:
    import sftrainer.builtin as builtin
    from sftrainer.preview import markers_for, preview_run
    from sftrainer.run_config import load_config

    items = list(args.items)
    first = items[0] if items and "=" not in items[0] else None
    overrides = items[1:] if first else items
    if first is not None and not first.lower().endswith((".yaml", ".yml")):  # a data source
        if args.model is None:
            raise ConfigError(
                f"sftrainer data {first}: give --model (a model directory, hub id or 'builtin'): "
                "its tokenizer and chat template decide the tokens"
            )
        overrides = [f"data.train={first}", "data.eval=null", *overrides]
        first = None
        defaults: dict[str, Any] | None = {"model": {"name_or_path": args.model}}
    else:
        defaults = builtin.DEMO_CONFIG if first is None else None
    if args.model is not None:
        overrides.append(f"model.name_or_path={args.model}")
    if args.rows < 0:
        raise ConfigError(f"--rows: must be >= 0, got {args.rows}")
    cfg = load_config(first, overrides, defaults=defaults)
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    markers = markers_for(getattr(sys.stdout, "encoding", None))
    bar = "\u2588" if markers != ("[[", "]]") else "#"
    print(
        preview_run(
            cfg,
            rows=args.rows,
            colour=colour,
            markers=markers,
            bar=bar,
            plot=args.plot,
            probe=args.probe,
            show_template=args.template,
        )
    )
    return 0


def cmd_eval(target: str, items: Sequence[str], output: str | None, base: str | None = None) -> int:
    from sftrainer.eval_run import evaluate_saved, format_metrics

    data = items[0] if items and "=" not in items[0] else None
    metrics, results = evaluate_saved(target, data, list(items[1:] if data else items), output, base)
    print(f"{format_metrics(metrics)}\nSaved to {results}")
    return 0


def cmd_report(run_dir: str) -> int:
    from sftrainer.report import write_report

    png, page = write_report(run_dir)
    print(f"Wrote {page}\nWrote {png}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from sftrainer.export import merge

    out = merge(args.run_dir, args.out_dir, base=args.base, dtype=args.dtype)
    print(f"Merged model saved to {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sftrainer.export import export

    exported = export(
        args.run_dir, args.out_dir, args.format, qtype=args.type, base=args.base, name=args.name
    )
    for path in exported.files:
        print(f"Wrote {path}")
    print(exported.message)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from sftrainer.generate import generate, load_for_inference

    model, tokenizer = load_for_inference(args.run_dir, base=args.base)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    print(generate(model, tokenizer, messages, args.max_new_tokens, args.temperature, images=args.image))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sftrainer.generate import chat, load_for_inference

    model, tokenizer = load_for_inference(args.run_dir, base=args.base)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())
    print(f"Chat with {args.run_dir}: /reset clears the history, /exit or Ctrl-D ends.", file=sys.stderr)

    def read_line() -> str:
        try:
            return input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()  # Ctrl-D leaves the cursor after the prompt
            raise

    chat(
        model,
        tokenizer,
        read_line,
        sys.stdout,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        images=args.image,
    )
    return 0


def _summary(metrics: dict[str, float], output_dir: str) -> str:
    from sftrainer.run import RESULTS_FILE  # torch / transformers: only once a command runs

    rows = []
    for key in ("loss", "exact_match"):
        before, after = metrics.get(f"eval_before_{key}"), metrics.get(f"eval_{key}")
        if after is not None:
            rows.append(f"  eval_{key:<12} {_fmt(before):>10} {_fmt(after):>10}")
    table = "\n".join([f"  {'':<17} {'before':>10} {'after':>10}", *rows]) if rows else "  (no eval data)"
    return textwrap.dedent(f"""
        Training finished in {metrics.get("train_runtime", 0):.0f}s (train loss {metrics.get("train_loss", float("nan")):.4f}).
        {"{table}"}
        Saved to {output_dir}  (metrics: {os.path.join(output_dir, RESULTS_FILE)})
        """).replace("{table}", table)


def _rank_label() -> str:
    """' (rank R of N)' in a process of a multi-process job, so the launcher's interleaved output says
    which process failed; '' otherwise."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only `sftrainer train --help` lists the keys: that imports the config (transformers, torch).
    parser = _parser(with_keys=argv[:1] == ["train"] and ("-h" in argv or "--help" in argv))
    # parse_known_args: key=value may follow --options (`train CONFIG --nproc 2 key=value`,
    # `data DATA --model M key=value`): argparse stops collecting positionals at an option.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("train", "data") or any(item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    try:
        if args.command == "train":
            return cmd_train([*args.items, *extra], args.nproc, args.accelerate_config, argv)
        if args.command == "data":
            args.items += extra
            return cmd_data(args)
        if args.command == "eval":
            return cmd_eval(args.target, args.items, args.output, args.base)
        if args.command == "report":
            return cmd_report(args.run_dir)
        if args.command in ("merge", "export", "generate", "chat"):
            commands = {"merge": cmd_merge, "export": cmd_export, "generate": cmd_generate, "chat": cmd_chat}
            return commands[args.command](args)
    except SFTrainerError as err:
        print(f"sftrainer: error{_rank_label()}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sftrainer: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
