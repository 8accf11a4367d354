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
