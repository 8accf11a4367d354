"""``torch_compile=True`` (a TrainingArguments field TRL users set) works with sftrainer's chunked loss and
packing: the compiled model trains the same per-step losses as the eager one (CPU, inductor)."""

from __future__ import annotations

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer

pytestmark = pytest.mark.slow  # compiling takes about half a minute on 2 CPU cores


def _losses(model_dir, output_dir, compile_: bool) -> tuple[list[float], str]:
    args = quick_args(output_dir, packing=True, torch_compile=compile_, logging_steps=1)
    trainer = SFTTrainer(model=str(model_dir), args=args, train_dataset=ROWS * 2)
    trainer.train()
    assert hasattr(trainer.model_wrapped, "_orig_mod") == compile_  # torch.compile's OptimizedModule
    return [e["loss"] for e in trainer.state.log_history if "loss" in e], trainer.loss_plan.describe()


def test_compiled_packed_training_matches_eager(tiny_model_dir, tmp_path):
    eager, _ = _losses(tiny_model_dir, tmp_path / "eager", compile_=False)
    compiled, plan = _losses(tiny_model_dir, tmp_path / "compiled", compile_=True)
    assert "no full-vocabulary logits" in plan  # still the chunked loss under torch.compile
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
