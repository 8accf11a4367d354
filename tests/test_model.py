"""``prepare_tokenizer``: chat template (text, file, or another tokenizer's), EOS and pad overrides,
defaults where the tokenizer has none, each bad setting a ``ConfigError`` naming the key; the
caller's tokenizer is never changed."""

from __future__ import annotations

import copy
import json

import pytest

from sftrainer import ConfigError, SFTConfig
from sftrainer.model import prepare_tokenizer

TEMPLATE = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]


def render(tokenizer) -> str:
    return tokenizer.apply_chat_template(CHAT, tokenize=False)


def snapshot(tokenizer) -> tuple:
    return tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer)


# ---- chat_template ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value", ["templates/chatml.jinja", "chatml.j2", "my_template.txt", "chat_template.json", "chatml"]
)
def test_mistyped_chat_template_path_is_a_config_error_naming_it(tokenizer, value):
    """Not taken for the template text (every row would then fail with a misleading message)."""
    with pytest.raises(ConfigError, match=f"chat_template: no such file: {value}"):
        prepare_tokenizer(tokenizer, value)
    with pytest.raises(ConfigError, match=f"chat_template: no such file: {value}"):
        SFTConfig(output_dir="out", chat_template=value)


def test_chat_template_text_and_files(tokenizer, tmp_path):
    assert render(prepare_tokenizer(tokenizer, TEMPLATE)) == "user: Hi<|im_end|>assistant: Yo<|im_end|>"
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    assert prepare_tokenizer(tokenizer, str(tmp_path / "t.jinja")).chat_template == TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    assert prepare_tokenizer(tokenizer, str(tmp_path / "chat_template.json")).chat_template == TEMPLATE
    (tmp_path / "bad.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(ConfigError, match=r"bad\.json has no 'chat_template' string"):
        prepare_tokenizer(tokenizer, str(tmp_path / "bad.json"))


# ---- chat_template_path (TRL) ----------------------------------------------------------------


def test_chat_template_path_jinja_file(tokenizer, tmp_path):
    (tmp_path / "t.jinja").write_text(TEMPLATE)
    prepared = prepare_tokenizer(tokenizer, chat_template_path=str(tmp_path / "t.jinja"))
    assert prepared.chat_template == TEMPLATE
    assert prepared.eos_token == tokenizer.eos_token


def test_chat_template_path_tokenizer_directory_brings_its_eos(tokenizer, tmp_path):
    source = copy.deepcopy(tokenizer)
    source.chat_template = "{% for m in messages %}{{ '<|im_start|>' + m['content'] + '<s>' }}{% endfor %}"
    source.eos_token = "<s>"
    source.save_pretrained(tmp_path / "source")
    prepared = prepare_tokenizer(tokenizer, chat_template_path=str(tmp_path / "source"))
    assert prepared.chat_template == source.chat_template
    assert prepared.eos_token == "<s>"  # as TRL's clone_chat_template
    assert prepared.eos_token_id == tokenizer.convert_tokens_to_ids("<s>")


def test_chat_template_path_adds_the_tokens_its_template_needs_to_a_copy(tokenizer, tmp_path):
    # As TRL's clone_chat_template (the trainer then grows the model's embeddings: test_template_tokens.py).
    source = copy.deepcopy(tokenizer)
    source.add_special_tokens({"additional_special_tokens": ["<|eot|>", "<|other|>"]})
    source.chat_template = "{% for m in messages %}{{ m['content'] + '<|eot|>' }}{% endfor %}"
    source.save_pretrained(tmp_path / "source")
    before = snapshot(tokenizer)
    prepared = prepare_tokenizer(tokenizer, chat_template_path=str(tmp_path / "source"))
    assert snapshot(tokenizer) == before
    assert len(prepared) == len(tokenizer) + 1 and "<|other|>" not in prepared.get_vocab()
    eot = prepared.convert_tokens_to_ids("<|eot|>")
    assert prepared(render(prepared), add_special_tokens=False)["input_ids"][-1] == eot  # one token


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"chat_template_path": "templates/missing.jinja"}, "chat_template_path: no such file: templates/missing.jinja"),
        ({"chat_template_path": "./models/missing"}, "chat_template_path: no such tokenizer directory: ./models/missing"),
        ({"chat_template_path": "a.jinja", "chat_template": TEMPLATE}, "set chat_template or chat_template_path, not both"),
        ({"eos_token": ""}, "eos_token: must be a token"),
    ],
)  # fmt: skip
def test_bad_template_settings_fail_in_the_config(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        SFTConfig(output_dir="out", **kwargs)


# ---- eos_token / pad_token (TRL) -------------------------------------------------------------


def test_eos_and_pad_token_overrides(tokenizer):
    prepared = prepare_tokenizer(tokenizer, eos_token="<s>", pad_token="<|im_start|>")
    assert (prepared.eos_token, prepared.pad_token) == ("<s>", "<|im_start|>")
    assert prepared.eos_token_id == tokenizer.convert_tokens_to_ids("<s>")
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<pad>")


@pytest.mark.parametrize("key", ["eos_token", "pad_token"])
def test_token_not_in_the_vocabulary_is_refused(tokenizer, key):
    with pytest.raises(ConfigError, match=rf"{key}: '<\|eot_id\|>' is not in the tokenizer's vocabulary"):
        prepare_tokenizer(tokenizer, **{key: "<|eot_id|>"})


# ---- defaults, and the caller's tokenizer ----------------------------------------------------


def test_a_ready_tokenizer_is_returned_as_is(tokenizer):
    assert prepare_tokenizer(tokenizer) is tokenizer


def test_defaults_go_on_a_copy(tokenizer):
    tokenizer.pad_token = None
    tokenizer.chat_template = None
    before = snapshot(tokenizer)
    prepared = prepare_tokenizer(tokenizer)
    assert prepared is not tokenizer
    assert prepared.pad_token == prepared.eos_token == "<|im_end|>"
    assert "### Assistant:" in prepared.chat_template
    assert snapshot(tokenizer) == before
