"""Bytes of a model's weights when loaded in float32, bf16, 4-bit (QLoRA's NF4 + double quantization)
and 8-bit, through ``sftrainer.model.load_model`` (what ``sftrainer train`` uses).

    .venv/bin/python bench/bench_quant_memory.py                  # the built-in tiny model
    .venv/bin/python bench/bench_quant_memory.py path/to/model    # any local checkpoint

Counts parameter storage plus bitsandbytes' quantization constants (4-bit absmax, nested when double
quantization is on; 8-bit row scales), not activations or optimizer state. Needs the quant extra.
"""

from __future__ import annotations

import argparse

import torch

from sftrainer import builtin
from sftrainer.model import load_model
from sftrainer.quant import model_bnb_config


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all weights, the quantizable linear layers' weights), quantization constants included."""
    total = linear = 0
    seen: set[int] = set()  # tied embeddings / lm_head: one tensor
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        size = weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)
        if state is not None:
            size += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                size += state.state2.absmax.numel() * state.state2.absmax.element_size()
        scales = getattr(weight, "SCB", None)
        if isinstance(scales, torch.Tensor):
            size += scales.numel() * scales.element_size()
        total += size
        linear += size if isinstance(module, torch.nn.Linear) and name != "lm_head" else 0
    # Weights not held by a module's `weight` (biases): counted once each.
    total += sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not n.endswith("weight")
    )
    return total, linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="checkpoint directory (default: built-in)")
    path = parser.parse_args().model or str(builtin.model_dir())
    rows = [
        ("float32", "float32", None),
        ("bfloat16", "bfloat16", None),
        ("4-bit nf4 + double quant", "float32", model_bnb_config(load_in_4bit=True)),
        ("4-bit nf4, rest bfloat16", "bfloat16", model_bnb_config(load_in_4bit=True)),
        ("8-bit", "float32", model_bnb_config(load_in_8bit=True)),
    ]
    print(f"{path}\n{'weights':28s} {'all (MB)':>9s} {'linear (MB)':>12s}")
    for label, dtype, config in rows:
        model = load_model(path, dtype=dtype, quantization_config=config)
        total, linear = weight_bytes(model)
        print(f"{label:28s} {total / 1e6:9.2f} {linear / 1e6:12.2f}")


if __name__ == "__main__":
    main()
