"""Memory: sftrainer vs TRL's SFTTrainer side by side, one configuration per subprocess.

    .venv/bin/pip install -e '.[bench,quant]'
    .venv/bin/python bench/bench_memory.py vocab      # large vocabulary: 128,256, max_length 2048, batch 1
    .venv/bin/python bench/bench_memory.py ladder     # one model, features added one rung at a time

``vocab``: a 2-layer, hidden-256 Llama with a 128,256-token vocabulary (Llama 3's), fp32, one
2048-token row per step: the logits (positions x vocabulary) dwarf everything else. Three runs:
sftrainer (the chunked loss, its default), sftrainer with the model's own LM head on the trained
positions (``lean``, its loss before the chunked one) and TRL.

``ladder``: a Llama with hidden 512, 8 layers, vocabulary 32,000, max_length 1024, batch 2 (rows
of about 1,000 tokens, loss on the completion). Each rung adds one feature to the one before, as in
torchtune's memory table; TRL runs the same settings (TRL computes its loss with its own fused LM
head on every rung, so its "chunked loss" rung equals its fp32 one). fp32 throughout: bf16 autocast
on the 2-core CPU it was measured on is several times slower for this model (see LADDER).

The tokenizer is trained locally on the generated words (4,096 tokens); the model's vocabulary is
larger than the tokenizer's, which changes nothing about the cost of the logits. Peak RSS is the
subprocess's ``ru_maxrss``, which includes the Python / torch runtime (about 0.5 GB here); speed is
trained tokens per second over the steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from bench_train import WORDS, Meter, step_clock  # bench/ is on sys.path when a script here is run

SUITES = {
    "vocab": dict(hidden=256, layers=2, heads=4, intermediate=688, vocab=128_256, max_length=2048, batch=1),
    "ladder": dict(hidden=512, layers=8, heads=8, intermediate=1408, vocab=32_000, max_length=1024, batch=2),
}
TINY = dict(hidden=64, layers=2, heads=2, intermediate=128, vocab=8192, max_length=128)
# (rung name, settings added to the rung before); "lean" = sftrainer without its chunked loss
# No bf16 rung: bf16 autocast on the 2-core CPU this was measured on took over 5 minutes for 4 steps of
# this model (fp32: about 1 minute); on a GPU add ("bf16 autocast", {"bf16": True}) after fp32.
LADDER = [
    ("fp32", {"lean": True}),
    ("chunked loss", {"lean": False}),
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("8-bit AdamW", {"optim": "adamw_8bit"}),
    ("LoRA r=16 all-linear", {"lora": True}),
    ("QLoRA (4-bit NF4 base)", {"qlora": True}),
]
VOCAB_RUNS = [("sftrainer", {}), ("sftrainer lean", {"lean": True}), ("trl", {})]


def build_assets(root: Path, suite: dict, rows: int = 64, seed: int = 0) -> tuple[Path, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftrainer.builtin import build_tokenizer

    model_dir, data_file = root / "model", root / "data.jsonl"
    if model_dir.is_dir() and data_file.is_file():
        return model_dir, data_file
    rng = random.Random(seed)
    words = suite["max_length"]  # about 1.5 tokens a word: every row is cut at max_length
    data = [
        {
            "prompt": " ".join(rng.choice(WORDS) for _ in range(60)),
            "completion": " " + " ".join(rng.choice(WORDS) for _ in range(words)),
        }
        for _ in range(rows)
    ]
    root.mkdir(parents=True, exist_ok=True)
    data_file.write_text("".join(json.dumps(r) + "\n" for r in data))
    tokenizer = build_tokenizer(
        [{"prompt": r["prompt"], "response": r["completion"]} for r in data[:16]], vocab_size=4096
    )
    import torch

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=suite["hidden"],
        num_hidden_layers=suite["layers"],
        num_attention_heads=suite["heads"],
        num_key_value_heads=suite["heads"],
        intermediate_size=suite["intermediate"],
        vocab_size=suite["vocab"],
        max_position_embeddings=suite["max_length"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, data_file


def run_one(trainer_name: str, settings: dict, suite_name: str, args: argparse.Namespace) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    suite = SUITES[suite_name]
    torch.manual_seed(0)
    model_dir, data_file = build_assets(Path(args.workdir) / suite_name, suite)
    dataset = load_dataset("json", data_files=str(data_file), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_kwargs = {"dtype": torch.float32, "attn_implementation": "sdpa"}
    if settings.get("qlora"):
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if settings.get("bf16") else torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **load_kwargs)
    peft_config = None
    if settings.get("lora") or settings.get("qlora"):
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(Path(args.workdir) / "out"),
        max_length=suite["max_length"],
        per_device_train_batch_size=suite["batch"],
        max_steps=args.steps + 1,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=bool(settings.get("bf16")),
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=bool(settings.get("gradient_checkpointing")),
        **({"optim": settings["optim"]} if "optim" in settings else {}),  # else the default: fused AdamW
        **({"loss_chunk_size": settings["chunk"]} if "chunk" in settings else {}),
    )
    if trainer_name == "trl":
        from trl import SFTConfig, SFTTrainer
    else:
        from sftrainer import SFTConfig, SFTTrainer

        common["overwrite_output_dir"] = True  # every setting trains into workdir/out (TRL has no such key)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**common),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if trainer_name == "sftrainer" and settings.get("lean"):
        from sftrainer.loss import without_chunking

        trainer.loss_plan = without_chunking(trainer.loss_plan, "bench: the model's own LM head")
    meter = Meter(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = meter
    clock = step_clock()
    step_times = clock.times
    trainer.add_callback(clock)
    trainer.train()
    trained = [b[2] for b in meter.batches]  # trained tokens of each batch
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    seconds = sum(step_times[1:])
    return {
        "trainer": trainer_name,
        "peak_rss_mb": _peak_rss_mb(),  # VmHWM: ru_maxrss carries the parent's RSS at fork
        "trained_tokens_per_s": sum(trained[1 : len(step_times)]) / seconds,
        "seconds_per_step": seconds / max(len(step_times) - 1, 1),
        "final_loss": losses[-1] if losses else float("nan"),
        "loss_plan": getattr(getattr(trainer, "loss_plan", None), "kind", "trl"),
    }


def _run(trainer_name: str, settings: dict, suite: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, suite, "--only", trainer_name, json.dumps(settings)]
    cmd += ["--steps", str(args.steps), "--workdir", args.workdir.removesuffix("-tiny")]
    cmd += ["--tiny"] if args.tiny else []
    print(f"running {suite}: {trainer_name} {settings} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"trainer": trainer_name, "error": proc.stderr.strip().splitlines()[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument(
        "--steps", type=int, default=3, help="timed optimizer steps per run (after 1 warm-up)"
    )
    parser.add_argument("--workdir", default="/tmp/sftrainer-bench-memory")
    parser.add_argument("--rungs", type=int, default=len(LADDER), help="ladder: run the first N rungs")
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model and short rows: checks that every run works"
    )
    parser.add_argument("--only", nargs=2, metavar=("TRAINER", "SETTINGS_JSON"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results JSON (default bench/memory-SUITE.json)")
    args = parser.parse_args()
    if args.tiny:
        SUITES[args.suite] = {**SUITES[args.suite], **TINY}
        args.workdir += "-tiny"
    if args.only:
        trainer_name = args.only[0].split()[0]
        print(json.dumps(run_one(trainer_name, json.loads(args.only[1]), args.suite, args)))
        return

    build_assets(Path(args.workdir) / args.suite, SUITES[args.suite])
    rows = []
    if args.suite == "vocab":
        for name, settings in VOCAB_RUNS:
            rows.append({"run": name, **_run(name, settings, "vocab", args)})
    else:
        settings: dict = {}
        for rung, added in LADDER[: args.rungs]:
            settings = {**settings, **added}
            for name in ("sftrainer", "trl"):
                rows.append({"rung": rung, "run": name, **_run(name, settings, "ladder", args)})
    print(f"\n{'run':<40}{'peak RSS MB':>12}{'trained tok/s':>15}{'s/step':>8}{'loss':>8}")
    for r in rows:
        label = f"{r.get('rung', '')} {r['run']}".strip()
        if "error" in r:
            print(f"{label:<40}  failed: {r['error']}")
            continue
        print(
            f"{label:<40}{r['peak_rss_mb']:>12.0f}{r['trained_tokens_per_s']:>15.0f}"
            f"{r['seconds_per_step']:>8.2f}{r['final_loss']:>8.3f}"
        )
    # A --tiny run only checks that every run works: its numbers go next to its assets, not into bench/.
    default = (
        Path(args.workdir) / f"memory-{args.suite}.json"
        if args.tiny
        else Path(f"bench/memory-{args.suite}.json")
    )
    out = Path(args.out) if args.out else default
    out.write_text(json.dumps({"suite": SUITES[args.suite], "runs": rows}, indent=2) + "\n")


def _peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM on Linux (``ru_maxrss`` carries the parent's RSS at fork)."""
    from sftrainer.memory_estimate import peak_process_memory

    return peak_process_memory() / 2**20


if __name__ == "__main__":
    main()
