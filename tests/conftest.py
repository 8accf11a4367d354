"""Shared fixtures: a tiny model and tokenizer built once per test session, no network."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def sftrainer_home(tmp_path_factory: pytest.TempPathFactory):
    """Keep the built-in model and data of the tests out of the user's cache."""
    home = tmp_path_factory.mktemp("sftrainer_home")
    old = os.environ.get("SFTRAINER_HOME")
    os.environ["SFTRAINER_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("SFTRAINER_HOME", None)
    else:
        os.environ["SFTRAINER_HOME"] = old


@pytest.fixture(scope="session")
def tiny_model_dir(sftrainer_home):
    """The built-in tiny Llama (random init), saved with save_pretrained."""
    from sftrainer import builtin

    return builtin.model_dir()


@pytest.fixture
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, sftrainer_home):
    """A short `sftrainer train` LoRA run on the built-in model (about 30 s of CPU): two prompts it
    learns to answer, a checkpoint at the last step. Returns the run directory."""
    import json

    from sftrainer.cli import main

    root = tmp_path_factory.mktemp("lora_run")
    rows = [
        {"prompt": "Reverse the words: cat dog", "response": "dog cat"},
        {"prompt": "Count the words: sun sun sun", "response": "3"},
    ] * 16
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    code = main(["train", f"data.train={data}", "data.eval=null", f"output_dir={run}", "max_steps=15",
                 "exact_match_samples=0", "per_device_train_batch_size=8", "lora.r=8", "lora.alpha=16",
                 "lora.dropout=0", "learning_rate=1e-2", "warmup_steps=0", "save_strategy=steps",
                 "save_steps=15", "disable_tqdm=true"])  # fmt: skip
    assert code == 0
    return run
