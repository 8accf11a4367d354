"""Training throughput: sftrainer vs TRL's SFTTrainer, side by side, same model, data and settings.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/bench_train.py                 # all configurations, prints a table + ratios
    .venv/bin/python bench/bench_train.py --steps 5       # quicker, noisier

Each (trainer, batching, precision) configuration runs in its own subprocess, so peak RSS is that
run's alone. Both trainers get the same locally built Llama-architecture model (hidden 512, 8 layers,
random weights), the same generated prompt/completion rows of varied length, max_length 512, the same
effective batch and number of optimizer steps. Throughput is measured over the optimizer steps after
a warm-up step, from a callback, so data preparation is not part of it (it is reported separately).
Trained tokens are tokens with label != -100.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (trainer, batching, precision)
    (t, b, p) for p in ("fp32", "bf16") for b in ("padding", "packing") for t in ("sftrainer", "trl")
]
WORDS = [f"w{i}" for i in range(3000)]


def build_assets(root: Path, rows: int, seed: int = 0) -> tuple[Path, Path]:
    """A ~25M-parameter Llama (hidden 512, 8 layers) with a locally trained tokenizer, and the data."""

    from sftrainer.builtin import build_model, build_tokenizer

    model_dir, data_file = root / "model", root / "data.jsonl"
    if model_dir.is_dir() and data_file.is_file():
        return model_dir, data_file
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        # Short instruction rows of varied length, as in real SFT sets: 5-120 word prompts, 3-80 word answers.
        prompt = " ".join(rng.choice(WORDS) for _ in range(int(rng.triangular(5, 120, 15))))
        completion = " ".join(rng.choice(WORDS) for _ in range(int(rng.triangular(3, 80, 10))))
        data.append({"prompt": prompt, "completion": " " + completion})
    root.mkdir(parents=True, exist_ok=True)
    with open(data_file, "w") as fh:
        for row in data:
            fh.write(json.dumps(row) + "\n")
    tokenizer = build_tokenizer(
        [{"prompt": r["prompt"], "response": r["completion"]} for r in data], vocab_size=4096
    )
    model = build_model(
        tokenizer, hidden=512, layers=8, seed=seed, intermediate=1408, heads=8, kv_heads=8, max_positions=2048
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data_file


class Meter:
    """Counts tokens of every batch the trainer draws and times the optimizer steps."""

    def __init__(self, collator, pad_id: int):
        self.collator, self.pad_id = collator, pad_id
        self.batches: list[tuple[int, int, int]] = []  # (positions, real tokens, trained tokens)

    def __call__(self, features):
        batch = self.collator(features)
        labels = batch["labels"]
        if "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # position-based batches: padding (if any) is labelled -100 and restarts positions
            real = sum(len(f["input_ids"]) for f in features)
        self.batches.append((labels.numel(), real, int((labels[:, 1:] != -100).sum())))
        return batch


def step_clock():
    """A TrainerCallback that records the seconds of every optimizer step in ``.times``."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    return StepClock()


def run_one(trainer_name: str, batching: str, precision: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_dir, data_file = build_assets(Path(args.workdir), args.rows)
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    common = dict(
        output_dir=str(Path(args.workdir) / f"out-{trainer_name}-{batching}-{precision}"),
        max_length=512,
        packing=batching == "packing",
        per_device_train_batch_size=args.batch if batching == "packing" else args.batch * args.rows_per_seq,
        gradient_accumulation_steps=1,
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=precision == "bf16",
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # TRL turns checkpointing on by default; both get the same setting so the comparison is
        # like for like (it trades about a third more compute for activation memory).
        gradient_checkpointing=args.gradient_checkpointing,
    )
    prep_start = time.perf_counter()
    if trainer_name == "trl":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        from sftrainer import SFTConfig, SFTTrainer

        trainer = SFTTrainer(  # a repeated measurement trains into the same directory
            model=model,
            args=SFTConfig(**common, overwrite_output_dir=True),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    prep_seconds = time.perf_counter() - prep_start
    meter = Meter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = meter
    clock = step_clock()
    step_times = clock.times
    trainer.add_callback(clock)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    # Skip the warm-up step (first batches, allocator growth); batches == steps (no accumulation).
    timed = meter.batches[1 : len(step_times)]
    seconds = sum(step_times[1:])
    positions = sum(b[0] for b in timed)
    real = sum(b[1] for b in timed)
    trained = sum(b[2] for b in timed)
    # Training FLOPs: 6 * parameters per token, plus attention (2 matmuls of 2*L*d per token per
    # layer, forward and backward: x3), counted over the positions actually computed.
    cfg = model.config if not hasattr(model, "base_model") else model.base_model.config
    attn = 12 * cfg.num_hidden_layers * cfg.hidden_size * 512
    flops = (6 * n_params + attn) * positions
    return {
        "trainer": trainer_name,
        "batching": batching,
        "precision": precision,
        "trained_tokens_per_s": trained / seconds,
        "tokens_per_s": real / seconds,
        "padding_fraction": 1 - real / positions,
        "peak_rss_mb": _peak_rss_mb(),  # VmHWM: ru_maxrss carries the parent's RSS at fork
        "final_loss": losses[-1] if losses else float("nan"),
        "achieved_tflops": flops / seconds / 1e12,
        "steps_timed": len(timed),
        "seconds": seconds,
        "prep_seconds": prep_seconds,
        "params_m": n_params / 1e6,
    }


def matmul_peak(precision: str) -> float:
    """Best of a few 2048^3 matmuls, in TFLOP/s: the MFU denominator on this machine."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    parser.add_argument("--batch", type=int, default=4, help="packed sequences of 512 tokens per step")
    parser.add_argument(
        "--rows-per-seq", type=int, default=4, help="padded rows per packed sequence (same work)"
    )
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--workdir", default="/tmp/sftrainer-bench")
    parser.add_argument("--only", nargs=3, metavar=("TRAINER", "BATCHING", "PRECISION"))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both trainers")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(*args.only, args)))
        return

    build_assets(Path(args.workdir), args.rows)
    results = []
    for trainer_name, batching, precision in CONFIGS:
        if precision not in args.precisions:
            continue
        cmd = [sys.executable, __file__, "--only", trainer_name, batching, precision]
        cmd += [
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--rows-per-seq",
            str(args.rows_per_seq),
        ]
        cmd += ["--rows", str(args.rows), "--workdir", args.workdir]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        print(f"running {trainer_name} {batching} {precision} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{trainer_name} {batching} {precision} failed")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["mfu"] = result["achieved_tflops"] / matmul_peak(precision)
        results.append(result)

    header = f"{'trainer':<10}{'batching':<9}{'prec':<6}{'trained tok/s':>14}{'tok/s':>9}{'pad %':>7}{'RSS MB':>8}{'loss':>8}{'MFU':>7}"
    print(header)
    for r in results:
        print(
            f"{r['trainer']:<10}{r['batching']:<9}{r['precision']:<6}{r['trained_tokens_per_s']:>14.0f}"
            f"{r['tokens_per_s']:>9.0f}{100 * r['padding_fraction']:>7.1f}{r['peak_rss_mb']:>8.0f}"
            f"{r['final_loss']:>8.3f}{100 * r['mfu']:>6.1f}%"
        )
    by = {(r["trainer"], r["batching"], r["precision"]): r for r in results}
    print("\nratios (sftrainer / TRL), trained tokens per second and peak RSS:")
    for precision in args.precisions:
        for ours, theirs in (("packing", "packing"), ("padding", "padding"), ("packing", "padding")):
            a, b = by.get(("sftrainer", ours, precision)), by.get(("trl", theirs, precision))
            if a and b:
                speed = a["trained_tokens_per_s"] / b["trained_tokens_per_s"]
                rss = a["peak_rss_mb"] / b["peak_rss_mb"]
                print(
                    f"  {precision}: sftrainer {ours} vs TRL {theirs}: speed x{speed:.2f}, peak RSS x{rss:.2f}"
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM on Linux (``ru_maxrss`` carries the parent's RSS at fork)."""
    from sftrainer.memory_estimate import peak_process_memory

    return peak_process_memory() / 2**20


if __name__ == "__main__":
    main()
