"""Exact token boundaries, BOS and EOS handling, truncation (``ExampleTokenizer`` directly)."""

from __future__ import annotations

import pytest
import tokenizers_zoo as zoo

from sftrainer.data.formats import PairExample, TextExample
from sftrainer.data.load import load
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.data.tokenize import IGNORE_INDEX, ExampleTokenizer, tokenize_pretokenized
from sftrainer.errors import ConfigError, RowError

PROMPT_ENDING_IN_SPACE = "Question: what is two plus two? Answer: "


def one(tok, example, **kwargs):
    return ExampleTokenizer(tok, **kwargs).tokenize([example])[0]


def crosses(tok, text: str, boundary: int) -> bool:
    """True when tokenizing ``text`` in one go puts a token across ``boundary``."""
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return any(s < boundary < e for s, e in offsets)


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_raw_pair_boundary_that_bpe_would_merge(kind):
    """A prompt ending with a space: whole-text tokenization merges the space into the answer's first
    token. The row keeps the prompt's own tokens, then the answer, with no space lost or added."""
    tok = zoo.build(kind, bos="<s>", eos="</s>", add_bos=True)
    prompt, answer = PROMPT_ENDING_IN_SPACE, "four."
    assert crosses(tok, prompt + answer, len(prompt))  # the case under test really happens
    out = one(tok, PairExample(prompt, answer))
    prompt_ids = tok(prompt)["input_ids"]  # with BOS
    assert out.input_ids[: len(prompt_ids)] == prompt_ids
    assert out.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    answer_ids = out.input_ids[len(prompt_ids) :]
    assert out.labels[len(prompt_ids) :] == answer_ids
    assert tok.decode(answer_ids) == "four.</s>"
    assert out.input_ids[0] == tok.bos_token_id
    assert tok.decode(out.input_ids[1:]) == prompt + answer + "</s>"  # no phantom "▁" before "four"


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_clean_boundary_keeps_whole_text_tokens(kind):
    tok = zoo.build(kind, bos=None, eos="</s>")
    prompt, answer = "Question: what is two plus two? Answer:", " four."
    assert not crosses(tok, prompt + answer, len(prompt))
    out = one(tok, PairExample(prompt, answer))
    assert out.input_ids == tok(prompt + answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert zoo.trained_spans(tok, out.input_ids, out.labels)[0].strip() == "four.</s>"


def test_multibyte_characters_at_the_boundary():
    tok = zoo.build("byte_level", bos=None, eos="</s>")
    out = one(tok, PairExample("Café ", "naïve ☕"))
    assert tok.decode(out.input_ids) == "Café naïve ☕</s>"
    assert zoo.trained_spans(tok, out.input_ids, out.labels) == ["naïve ☕</s>"]


def test_never_two_bos_when_the_text_starts_with_bos():
    tok = zoo.build("byte_level", bos="<s>", eos="</s>", add_bos=True)
    for example in (TextExample("<s>Hello world!"), PairExample("<s>Hi?", " Hello."), TextExample("Hi")):
        out = one(tok, example)
        assert out.input_ids[0] == tok.bos_token_id
        assert out.input_ids.count(tok.bos_token_id) == 1


def test_no_bos_for_a_tokenizer_that_adds_none():
    tok = zoo.build("byte_level", bos="<s>", eos="</s>", add_bos=False)  # has a BOS, never adds it
    out = one(tok, TextExample("Hello"))
    assert tok.bos_token_id not in out.input_ids


def test_eos_always_trained_and_never_doubled():
    tok = zoo.build("byte_level", bos=None, eos="</s>")
    for example, text in [
        (PairExample("Hi?", " Hello."), "Hi? Hello.</s>"),
        (PairExample("Hi?", " Hello.</s>"), "Hi? Hello.</s>"),
        (TextExample("Hello world!\n"), "Hello world!\n</s>"),
    ]:
        out = one(tok, example)
        assert tok.decode(out.input_ids) == text
        assert out.input_ids[-1] == out.labels[-1] == tok.eos_token_id


def test_truncation_is_flagged_and_respects_max_length():
    tok = zoo.build("byte_level", bos="<s>", eos="</s>", add_bos=True)
    example = PairExample("Count the words: apple berry cat dog.", " four")
    full = one(tok, example)
    cut = one(tok, example, max_length=len(full.input_ids) - 2)
    assert not full.truncated and cut.truncated
    assert cut.input_ids == full.input_ids[:-2] and cut.labels == full.labels[:-2]
    exact = one(tok, example, max_length=len(full.input_ids))
    assert not exact.truncated and exact.input_ids == full.input_ids


def test_n_trained_ignores_the_first_position():
    tok = zoo.build("byte_level", bos=None, eos="</s>")
    out = one(tok, TextExample("Hello"))
    assert out.n_trained == len(out.input_ids) - 1  # nothing predicts the first token


def test_batch_equals_one_by_one():
    tok = zoo.llama3()
    examples = [PairExample(PROMPT_ENDING_IN_SPACE, "four."), TextExample("Hi"), PairExample("2+2=", "4")]
    enc = ExampleTokenizer(tok)
    assert enc.tokenize(examples) == [enc.tokenize([ex])[0] for ex in examples]


def test_unknown_train_on_is_rejected():
    with pytest.raises(ConfigError, match=r"train_on: must be one of .*did you mean 'response'"):
        prepare(load([{"text": "hi"}]), zoo.chatml(), DataSettings(train_on="responses"))


def test_pretokenized_validation():
    assert tokenize_pretokenized({"input_ids": [1, 2, 3], "labels": None}, None).labels == [1, 2, 3]
    out = tokenize_pretokenized({"input_ids": [1, 2, 3, 4], "labels": [-100, 2, 3, 4]}, 3)
    assert out.truncated and out.input_ids == [1, 2, 3] and out.labels == [-100, 2, 3]
    with pytest.raises(RowError) as err:
        tokenize_pretokenized({"input_ids": [1, 2, 3], "labels": [1, 2]}, None)
    assert err.value.field == "labels" and "as long as input_ids (3)" in str(err.value)
    for bad in ([], "1 2 3", [1, "2"], None):
        with pytest.raises(RowError) as err:
            tokenize_pretokenized({"input_ids": bad}, None)
        assert err.value.field == "input_ids"
