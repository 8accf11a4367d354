"""``sftrainer eval``: a trained run directory (full and LoRA) and a checkpoint evaluate to the
metrics training reported; the data defaults to the run's eval data; bad input exits 2."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
from tiny_models import ROWS

from sftrainer.cli import main

pytestmark = pytest.mark.slow

SHORT = ["max_steps=2", "per_device_train_batch_size=2", "max_length=64", "exact_match_samples=2",
         "exact_match_max_new_tokens=4", "logging_steps=1", "learning_rate=1e-2"]  # fmt: skip


def run_quietly(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture(scope="module", params=["full", "lora"])
def run_dir(request, tmp_path_factory, data_file, sftrainer_home):
    """A two-step run on ROWS (eval = the same file), saved with a checkpoint at step 2."""
    out_dir = tmp_path_factory.mktemp(request.param)
    lora = ["lora.r=4", "lora.alpha=8"] if request.param == "lora" else []
    code, _ = run_quietly(
        "train", f"output_dir={out_dir}", f"data.train={data_file}", f"data.eval={data_file}",
        "save_strategy=steps", "save_steps=2", *SHORT, *lora,
    )  # fmt: skip
    assert code == 0
    return out_dir


def test_eval_a_run_dir_reproduces_the_final_metrics(run_dir):
    trained = json.loads((run_dir / "all_results.json").read_text())
    code, out = run_quietly("eval", str(run_dir))
    assert code == 0
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)
    assert results["eval_mean_token_accuracy"] == pytest.approx(trained["eval_mean_token_accuracy"], rel=1e-4)
    assert results["eval_perplexity"] == pytest.approx(math.exp(results["eval_loss"]))
    # exact_match_samples=2 came from the run's sftrainer_config.yaml.
    assert results["eval_exact_match"] == trained["eval_exact_match"]
    assert "eval_normalized_match" in results
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.startswith("  eval_")}
    assert lines["eval_loss"] == f"{results['eval_loss']:.4f}"
    assert f"Saved to {run_dir / 'eval_results.json'}" in out
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").read_text().splitlines()]
    assert [s["reference"] for s in samples] == [r["response"] for r in ROWS[:2]]


def test_eval_a_checkpoint_with_data_and_overrides(run_dir, data_file, tmp_path):
    out = tmp_path / "evals"
    code, _ = run_quietly(
        "eval", str(run_dir / "checkpoint-2"), str(data_file), "exact_match_samples=3", "--output", str(out)
    )
    assert code == 0
    results = json.loads((out / "eval_results.json").read_text())
    trained = json.loads((run_dir / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)  # step 2 is the end
    samples = (out / "eval_samples" / "step-2.jsonl").read_text().splitlines()
    assert len(samples) == 3


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err[err.index("sftrainer: error: ") :].strip()


def test_eval_errors_exit_2(capsys, tmp_path, data_file, tiny_model_dir):
    assert _error(capsys, "eval", str(tmp_path / "nope")) == (
        f"sftrainer: error: no such run, model or checkpoint directory: {tmp_path / 'nope'}"
    )
    assert "not a model directory (no config.json or adapter_config.json)" in _error(
        capsys, "eval", str(tmp_path), str(data_file)
    )
    assert "no eval data: pass DATA" in _error(capsys, "eval", str(tiny_model_dir), f"--output={tmp_path}")
    assert "DATA: no such file or directory" in _error(capsys, "eval", "builtin", str(tmp_path / "x.jsonl"))


def test_eval_an_adapter_whose_base_is_builtin(run_dir, data_file, tmp_path):
    if not (run_dir / "adapter_config.json").is_file():
        pytest.skip("a full model has no adapter_config.json")
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir, adapter, ignore=shutil.ignore_patterns("checkpoint-*", "eval_*"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "builtin"}))
    code, _ = run_quietly("eval", str(adapter), str(data_file))
    assert code == 0
    results = json.loads((adapter / "eval_results.json").read_text())
    trained = json.loads((run_dir / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_eval_an_adapter_whose_base_moved_takes_base(run_dir, data_file, tmp_path, capsys):
    """The recorded base is gone (and the run's config, which names it too, stays behind): ``--base``."""
    if not (run_dir / "adapter_config.json").is_file():
        pytest.skip("a full model has no adapter_config.json")
    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir, adapter, ignore=shutil.ignore_patterns("checkpoint-*", "eval_*", "*.yaml"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    gone = str(tmp_path / "moved-base")
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": gone}))
    assert "--base PATH" in _error(capsys, "eval", str(adapter), str(data_file))
    code, _ = run_quietly("eval", str(adapter), str(data_file), "--base", "builtin")
    assert code == 0
    results = json.loads((adapter / "eval_results.json").read_text())
    trained = json.loads((run_dir / "all_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(trained["eval_loss"], rel=1e-4)


def test_eval_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("RUN_DIR_OR_MODEL", "[DATA]", "--output", "--base", "eval_results.json", "checkpoint"):
        assert text in out, f"{text!r} missing from eval --help"
