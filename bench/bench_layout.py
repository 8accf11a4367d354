"""Cost of one forward + backward of 2,048 tokens in the batch layouts packing can use (CPU, SDPA).

    .venv/bin/python bench/bench_layout.py        # uses the model bench_train.py builds

Layouts: four packed rows [4, 512] with position_ids (what sftrainer uses on eager / SDPA), one
flat row [1, 2048] with position_ids (what TRL 1.16 and FlashAttention varlen use), and plain causal
[4, 512] without any mask as the floor. Best of 3 runs each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_train import build_assets
from transformers import AutoModelForCausalLM


def best_step_seconds(model, batch: dict, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="/tmp/sftrainer-bench")
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    model_dir, _ = build_assets(Path(args.workdir), args.rows)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    ids = torch.randint(5, model.config.vocab_size, (4, 512), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(128).repeat(4).repeat(4, 1)  # four 128-token rows in each sequence
    layouts = {
        "packed rows [4, 512]": {"input_ids": ids, "labels": ids, "position_ids": positions},
        "flat row [1, 2048]": {
            "input_ids": ids.reshape(1, -1),
            "labels": ids.reshape(1, -1),
            "position_ids": positions.reshape(1, -1),
        },
        "plain causal [4, 512] (no isolation)": {"input_ids": ids, "labels": ids},
    }
    for name, batch in layouts.items():
        print(f"{name:<38} {best_step_seconds(model, batch):.2f} s")


if __name__ == "__main__":
    main()
