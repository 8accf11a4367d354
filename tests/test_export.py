"""`sftrainer merge` and the model card: the merged model gives the adapter model's logits, loads with
plain transformers, and every run and merged model carries a README.md saying how it was made."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrainer import builtin
from sftrainer.cli import main
from sftrainer.generate import prompt_ids
from sftrainer.run import read_run, resolve_base

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

# fp32 throughout: merging W + B @ A * scale changes only the rounding of the sums.
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "merged"
    assert main(["merge", str(lora_run), str(out)]) == 0
    return out


def test_merged_logits_equal_adapter_logits(lora_run, merged, tokenizer):
    ids = [*prompt_ids(tokenizer, [{"role": "user", "content": "Reverse the words: cat dog"}]), 5, 9, 17]
    base = AutoModelForCausalLM.from_pretrained(builtin.model_dir())
    base_logits = logits(base, ids)
    adapter_logits = logits(PeftModel.from_pretrained(base, lora_run), ids)
    assert not torch.allclose(base_logits, adapter_logits, atol=1e-3), "the adapter did not change the model"
    # Plain transformers: no peft, no sftrainer, no trust_remote_code.
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(logits(plain, ids), adapter_logits, **TOLERANCE)


def test_merged_dir_contents(merged, tokenizer):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "sftrainer_config.yaml",
                 "all_results.json"):  # fmt: skip
        assert (merged / name).is_file(), name
    assert not (merged / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(merged).chat_template == tokenizer.chat_template


def test_merged_model_card(lora_run, merged):
    card = (merged / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "builtin" and front["library_name"] == "transformers"
    assert {"sftrainer", "lora", "merged"} <= set(front["tags"])
    assert "a LoRA adapter merged into its base: a full model" in card
    assert "(32 rows)" in card  # the row count, carried over from the run's card
    assert f"sftrainer merge {lora_run} {merged}" in card
    assert f"sftrainer train {lora_run / 'sftrainer_config.yaml'}" in card


def test_run_model_card(lora_run):
    """What `train()` writes: base model, data with row counts, settings, metrics, the command."""
    card = (lora_run / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "builtin" and front["library_name"] == "peft"
    assert front["sftrainer"]["rows"] == {"train": 32}
    data_file = lora_run.parent / "train.jsonl"
    assert f"- train: `{data_file}` (32 rows)" in card
    assert "- method: LoRA (r=8, alpha=16, dropout=0.0, target_modules=all-linear" in card
    for line in ("- max_steps: 15", "- learning_rate: 0.01", "- per_device_train_batch_size: 8", "- seed: 0"):
        assert line in card
    results = json.loads((lora_run / "all_results.json").read_text())
    assert f"| train_loss | {results['train_loss']:.4g} |" in card
    assert f"sftrainer train {lora_run / 'sftrainer_config.yaml'}" in card


def test_merge_a_checkpoint(lora_run, merged, tmp_path, capsys):
    """checkpoint-<step> works as RUN_DIR; its config and results are found one level up."""
    code, out, err = cli(capsys, "merge", str(lora_run / "checkpoint-15"), str(tmp_path / "m"))
    assert code == 0, err
    assert "Merged model saved to" in out
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    b = AutoModelForCausalLM.from_pretrained(merged).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)  # the last checkpoint is the final model
    card = (tmp_path / "m" / "README.md").read_text()
    assert "- max_steps: 15" in card and "(32 rows)" in card  # the run's config and row counts
    assert "No metrics were recorded." in card  # the run's final metrics do not describe a checkpoint


def test_merge_of_a_qlora_run_uses_the_full_precision_base(lora_run, tmp_path, caplog, capsys):
    run = tmp_path / "qlora"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = yaml.safe_load((run / "sftrainer_config.yaml").read_text())
    config["model_init_kwargs"] = {"quantization_config": {"load_in_4bit": True}}
    (run / "sftrainer_config.yaml").write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO", logger="sftrainer.export"):
        code, _, err = cli(capsys, "merge", str(run), str(tmp_path / "m"))
    assert code == 0, err
    assert "trained on a quantized base (QLoRA); merging into the full-precision base weights" in caplog.text


# ---- the base of an adapter -------------------------------------------------------------


def fake_adapter(path, base, config=None):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    if config is not None:
        (path / "sftrainer_config.yaml").write_text(yaml.safe_dump(config))
    return read_run(path)


def test_resolve_base(tmp_path, tiny_model_dir, monkeypatch):
    assert resolve_base(fake_adapter(tmp_path / "a", "builtin")) == str(builtin.model_dir())
    (tmp_path / "base").mkdir()
    (tmp_path / "cwd" / "here").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd" / "here")  # "../base" from the working directory does not exist
    assert resolve_base(fake_adapter(tmp_path / "b", "../base")) == str(tmp_path / "b" / "../base")
    # The recorded cache path is gone (another machine, another $SFTRAINER_HOME): the run config says builtin.
    run = fake_adapter(tmp_path / "c", "/gone/builtin-llama-v1", {"model": {"name_or_path": "builtin"}})
    assert resolve_base(run) == str(builtin.model_dir())
    assert resolve_base(run, base=str(tmp_path / "base")) == str(tmp_path / "base")
    assert resolve_base(fake_adapter(tmp_path / "d", "org/model")) == "org/model"  # a hub id


# ---- errors: exit 2, one clear message, no traceback ------------------------------------


def test_merge_errors(lora_run, merged, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    fake_adapter(tmp_path / "lost", "/gone/base")
    stored_4bit = tmp_path / "base4"
    stored_4bit.mkdir()
    (stored_4bit / "config.json").write_text(json.dumps({"quantization_config": {"load_in_4bit": True}}))
    cases = [
        ((str(tmp_path / "nope"), str(tmp_path / "o1")), "no such run directory"),
        ((str(tmp_path / "full"), str(tmp_path / "o2")), "is not a run directory: it holds neither adapter_config.json"),
        ((str(merged), str(tmp_path / "o3")), "holds a full model (config.json, no adapter_config.json): there is no LoRA adapter to merge"),
        ((str(lora_run), str(tmp_path / "taken")), "already exists and is not empty"),
        ((str(tmp_path / "lost"), str(tmp_path / "o4")), "base model '/gone/base' is not found"),
        ((str(lora_run), str(tmp_path / "o5"), "--base", str(stored_4bit)), "is stored quantized"),
    ]  # fmt: skip
    for argv, expected in cases:
        code, out, err = cli(capsys, "merge", *argv)
        assert code == 2, (argv, err)
        assert "sftrainer: error: " in err and expected in err, (expected, err)
        assert "Traceback" not in err and out == ""
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_full_fine_tune_card(tmp_path):
    from sftrainer.export import run_card
    from sftrainer.run_config import load_config

    cfg = load_config(None, [f"output_dir={tmp_path}", "data.eval_split=0.1", "learning_rate=3e-5"])
    run_card(cfg, {"eval_loss": 1.23456, "train_loss": 2.0}, {"train": 90, "eval": 10})
    card = (tmp_path / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "full-fine-tune" in front["tags"]
    assert "- method: full fine-tuning" in card and "- learning_rate: 3e-05" in card
    assert "- train: `builtin` (90 rows)" in card and "- eval: `10% of the train data` (10 rows)" in card
    assert "| eval_loss | 1.235 |" in card
    assert "- max_steps" not in card and "- num_train_epochs: 3.0" in card


def test_merge_saves_in_the_base_checkpoint_dtype(lora_run, tmp_path, capsys):
    """--dtype auto: a bf16 base gives a bf16 merged model (merged in float32, then cast)."""
    bf16_base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(builtin.model_dir(), dtype=torch.bfloat16).save_pretrained(bf16_base)
    assert cli(capsys, "merge", str(lora_run), str(tmp_path / "a"), "--base", str(bf16_base))[0] == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype="auto").dtype == torch.bfloat16
    code = cli(
        capsys, "merge", str(lora_run), str(tmp_path / "b"), "--base", str(bf16_base), "--dtype", "float32"
    )[0]
    assert code == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype="auto").dtype == torch.float32


def test_merge_dora_adapter_saved_from_python(tiny_model_dir, tokenizer, tmp_path, capsys):
    """An adapter saved by the Python API (no sftrainer_config.yaml beside it), DoRA: same equivalence."""
    from peft import LoraConfig
    from tiny_models import ROWS, quick_args

    from sftrainer import SFTTrainer

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False
    )
    trainer = SFTTrainer(str(tiny_model_dir), args=quick_args(tmp_path / "t", max_steps=1), train_dataset=ROWS,
                         processing_class=tokenizer, peft_config=config)  # fmt: skip
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    code, _, err = cli(capsys, "merge", str(tmp_path / "run"), str(tmp_path / "merged"))
    assert code == 0, err
    ids = trainer.train_dataset[0]["input_ids"]
    torch.testing.assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids),
        logits(trainer.model, ids),
        **TOLERANCE,
    )
    card = (tmp_path / "merged" / "README.md").read_text()
    assert (
        f"sftrainer merge {tmp_path / 'run'} {tmp_path / 'merged'}" in card and "sftrainer train" not in card
    )
