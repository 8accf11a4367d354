"""The recipe (sftrainer/train.py): the final evaluation reuses the last step's own when that step
evaluated the weights training ended with."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sftrainer.train import last_step_evaluation

pytestmark = pytest.mark.slow

ROWS = [{"prompt": f"Count the words: {'sun ' * n}", "response": str(n)} for n in range(1, 9)]


def test_the_last_steps_evaluation_is_not_run_again(tmp_path, capsys, monkeypatch):
    from sftrainer.cli import main
    from sftrainer.trainer import SFTTrainer

    calls = []
    evaluate = SFTTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("metric_key_prefix", "eval"))
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "evaluate", counted)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    run = tmp_path / "run"
    code = main(["train", f"data.train={data}", f"data.eval={data}", f"output_dir={run}", "max_steps=4",
                 "eval_strategy=steps", "eval_steps=2", "logging_steps=1", "per_device_train_batch_size=4",
                 "exact_match_samples=0", "save_strategy=no", "disable_tqdm=true"])  # fmt: skip
    assert code == 0
    assert calls == ["eval_before", "eval", "eval"]  # before training, steps 2 and 4; none after
    out = capsys.readouterr().out
    assert sum(line.startswith("eval @ step 4/4") for line in out.splitlines()) == 1, out
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_4 = next(r for r in last if r.get("step") == 4 and "eval_loss" in r)
    results = json.loads((run / "all_results.json").read_text())
    assert results["eval_loss"] == step_4["eval_loss"] and "eval_before_loss" in results


def _state(best: int | None, history: list[dict]) -> SimpleNamespace:
    return SimpleNamespace(global_step=30, best_global_step=best, log_history=history)


def test_last_step_evaluation_only_when_it_measured_the_final_weights():
    history = [
        {"eval_before_loss": 3.0, "step": 0},
        {"loss": 2.0, "step": 30},
        {"eval_a_loss": 1.0, "eval_a_runtime": 2.0, "epoch": 1.0, "step": 30},
        {"eval_b_loss": 1.5, "epoch": 1.0, "step": 30},
    ]
    plain = SimpleNamespace(load_best_model_at_end=False)
    merged = {"eval_a_loss": 1.0, "eval_a_runtime": 2.0, "eval_b_loss": 1.5, "epoch": 1.0}
    assert last_step_evaluation(_state(None, history), plain) == merged
    best = SimpleNamespace(load_best_model_at_end=True)
    assert last_step_evaluation(_state(30, history), best) == merged  # the last step was the best
    assert last_step_evaluation(_state(20, history), best) == {}  # step 20's weights are loaded
    assert last_step_evaluation(_state(None, history[:2]), plain) == {}  # the last step did not evaluate
