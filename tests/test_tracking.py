"""Experiment trackers, read back: TensorBoard event files with TensorBoard's own reader, and a W&B
offline run (when wandb is installed). Both also get the generation samples of each evaluation."""

from __future__ import annotations

import importlib.util

import pytest
from tiny_models import ROWS, quick_args

from sftrainer import SFTTrainer
from sftrainer.tracking import markdown_table

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def train(tiny_model_dir, tmp_path, report_to: str) -> SFTTrainer:
    args = quick_args(
        tmp_path, max_steps=4, logging_steps=1, eval_strategy="steps", eval_steps=2, report_to=report_to,
        exact_match_samples=2, exact_match_max_new_tokens=4,
    )  # fmt: skip
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2])
    trainer.train()
    return trainer


def test_markdown_table_escapes_cells():
    table = markdown_table([{"prompt": "a|b", "reference": "x\ny", "prediction": None}])
    assert table.splitlines() == [
        "| prompt | reference | prediction |",
        "|---|---|---|",
        "| a\\|b | x<br>y |  |",
    ]


def test_tensorboard_event_files_hold_scalars_and_samples(tiny_model_dir, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed (pip install 'sftrainer[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_model_dir, tmp_path, "tensorboard")
    run_dirs = [p.parent for p in (tmp_path / "runs").rglob("events.out.tfevents.*")]
    assert run_dirs, "no TensorBoard event file under output_dir/runs"
    acc = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/learning_rate",
        "train/mean_token_accuracy",
        "eval/loss",
        "eval/exact_match",
    ):
        assert tag in scalars, f"{tag} missing from {scalars}"
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 4]
    # add_text is stored as a tensor summary holding the Markdown table
    assert "eval/generation_samples/text_summary" in acc.Tags()["tensors"]
    events = acc.Tensors("eval/generation_samples/text_summary")
    assert [e.step for e in events] == [2, 4]
    text = events[-1].tensor_proto.string_val[0].decode()
    assert text.startswith("| prompt | reference | prediction |")
    assert ROWS[0]["response"] in text or ROWS[1]["response"] in text


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="wandb is not installed (pip install 'sftrainer[wandb]'); it is not part of the dev extra",
)
def test_wandb_offline_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "sftrainer-test")
    import wandb

    logged: list[dict] = []
    real_log = wandb.sdk.wandb_run.Run.log  # wandb.init rebinds the module's wandb.log to the run's

    def spy(run, data, *args, **kwargs):
        logged.append(data)
        return real_log(run, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    train(tiny_model_dir, tmp_path, "wandb")
    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb")), "no offline run written"
    tables = [d["eval/generation_samples"] for d in logged if "eval/generation_samples" in d]
    assert len(tables) == 2 and tables[-1].columns == ["prompt", "reference", "prediction"]
    assert any("train/loss" in d for d in logged) and any("eval/loss" in d for d in logged)


def scalars_under(root) -> dict[str, list[int]]:
    """Every scalar tag under ``root`` (all its TensorBoard runs and event files) -> its steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for run_dir in sorted({p.parent for p in root.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return {tag: sorted(s) for tag, s in steps.items()}


def test_tensorboard_curves_land_in_output_dir_from_an_evaluation_before_training(
    tiny_model_dir, tmp_path, monkeypatch
):
    """`sftrainer train` evaluates before training (train.py): that first log must not open the writer
    in ./runs of the launch directory (transformers sets its directory only in on_train_begin)."""
    pytest.importorskip(
        "tensorboard", reason="tensorboard is not installed (pip install 'sftrainer[tensorboard]')"
    )
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    args = quick_args(
        out, max_steps=6, logging_steps=2, eval_strategy="steps", eval_steps=3, report_to="tensorboard"
    )
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, eval_dataset=ROWS[:2])
    trainer.evaluate(metric_key_prefix="eval_before")  # as train.py: the before/after comparison
    trainer.train()
    trainer.evaluate()
    assert not list(cwd.iterdir()), f"written in the launch directory: {list(cwd.rglob('*'))}"
    steps = scalars_under(out / "runs")
    assert steps["eval/before_loss"] == [0]
    assert steps["train/loss"] == [2, 4, 6]
    assert steps["eval/loss"] == [3, 6, 6]  # at eval_steps, then the final evaluation
