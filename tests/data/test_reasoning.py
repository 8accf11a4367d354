"""An empty reasoning block a chat template writes before an answer with no reasoning is context.

Qwen3's template renders a last answer that carries no reasoning as ``<think>\\n\\n</think>\\n\\nanswer``.
At inference that block ends the prompt in non-thinking mode (``enable_thinking=False``) and is where
the model writes its reasoning in thinking mode: training it empty teaches the model to skip thinking.
These tests read the labels of prepared rows under released templates (``chat_templates/``, byte for
byte) and state what is trained with text written here, not with the pipeline's own helpers.
"""

from __future__ import annotations

import json
import logging

import pytest
import released_templates as rt

from sftrainer.cli import main
from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.formats import ChatExample, normalise_messages
from sftrainer.data.load import load
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.data.tokenize import ExampleTokenizer

PLAIN = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
]
WITH_REASONING = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.", "reasoning_content": "Two and two make four."},
]
# Templates whose rendering of PLAIN writes an empty reasoning block, and that block's text.
EMPTY_BLOCKS = {
    "qwen3": "<think>\n\n</think>\n\n",
    "qwen3.5": "<think>\n\n</think>\n\n",
    "glm-4.6": "\n<think></think>\n",
    "step-3.5-flash": "<think>\n\n</think>\n",
    "laguna-s-2.1": "<think></think>",
    "ling-3.0-flash": "<think></think>",
}
# Reasoning templates that write no empty block for an answer without reasoning: nothing changes.
NO_EMPTY_BLOCK = ("qwq-32b", "deepseek-r1-distill-qwen", "deepseek-r1-distill-llama", "gpt-oss")


def tokenizer_for(name):
    tok = rt.tokenizer(name)
    tok.chat_template = rt.template(name)
    return tok


def trained_and_prompt(tok, messages, **kwargs):
    """The decoded trained text of each span, and the ids before the first span."""
    encoder = ExampleTokenizer(tok, **kwargs)
    example = ChatExample(normalise_messages(messages, "messages"))
    (row,) = encoder.encode([(example, encoder.segments(example))])[0]
    spans, current, first = [], [], None
    for k, (token, label) in enumerate(zip(row.input_ids, [*row.labels])):
        if label != IGNORE_INDEX:
            first = k if first is None else first
            current.append(token)
        elif current:
            spans.append(tok.decode(current))
            current = []
    if current:
        spans.append(tok.decode(current))
    return spans, row.input_ids[:first], encoder.untrained_empty_reasoning


def test_qwen3_does_not_train_the_empty_think_block():
    tok = tokenizer_for("qwen3")
    full = tok.apply_chat_template(PLAIN, tokenize=False)
    assert "<think>\n\n</think>\n\nIt is 4.<|im_end|>" in full  # the template writes it
    spans, prompt, untrained = trained_and_prompt(tok, PLAIN)
    assert spans == ["It is 4.<|im_end|>"]
    assert untrained == 1
    # The prompt is what inference gives in non-thinking mode, token for token.
    non_thinking = tok.apply_chat_template(
        PLAIN[:1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert non_thinking.endswith("<think>\n\n</think>\n\n")
    assert prompt == tok(non_thinking, add_special_tokens=False)["input_ids"]


def test_qwen3_trains_reasoning_the_row_carries():
    spans, _, untrained = trained_and_prompt(tokenizer_for("qwen3"), WITH_REASONING)
    assert spans == ["<think>\nTwo and two make four.\n</think>\n\nIt is 4.<|im_end|>"]
    assert untrained == 0


def test_the_setting_trains_the_empty_block():
    spans, _, untrained = trained_and_prompt(tokenizer_for("qwen3"), PLAIN, train_empty_reasoning=True)
    assert spans == ["<think>\n\n</think>\n\nIt is 4.<|im_end|>"]
    assert untrained == 0


def test_only_the_last_answer_has_a_block_in_a_multi_turn_conversation():
    messages = [*PLAIN, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]
    spans, _, untrained = trained_and_prompt(tokenizer_for("qwen3"), messages)
    assert spans == ["It is 4.<|im_end|>", "Six.<|im_end|>"]
    assert untrained == 1  # Qwen3 writes the block in the last turn only


@pytest.mark.parametrize("name", sorted(EMPTY_BLOCKS))
def test_released_templates_that_write_an_empty_block(name):
    tok = tokenizer_for(name)
    full = tok.apply_chat_template(PLAIN, tokenize=False)
    assert EMPTY_BLOCKS[name] + "It is 4." in full
    spans, _, untrained = trained_and_prompt(tok, PLAIN)
    assert len(spans) == 1 and spans[0].startswith("It is 4.") and "think" not in spans[0]
    assert untrained == 1
    trained_block, _, _ = trained_and_prompt(tok, PLAIN, train_empty_reasoning=True)
    head = trained_block[0].split("It is 4.")[0]  # the block, or its part after the generation prompt
    assert head and EMPTY_BLOCKS[name].endswith(head)


@pytest.mark.parametrize("name", NO_EMPTY_BLOCK)
def test_reasoning_templates_without_an_empty_block_are_unchanged(name):
    tok = tokenizer_for(name)
    spans, prompt, untrained = trained_and_prompt(tok, PLAIN)
    assert untrained == 0
    assert (spans, prompt) == trained_and_prompt(tok, PLAIN, train_empty_reasoning=True)[:2]
    assert "It is 4." in spans[0] and "think" not in spans[0]


def test_prepare_counts_and_says_so_once(caplog):
    tok = tokenizer_for("qwen3")
    rows = [{"messages": PLAIN}, {"messages": WITH_REASONING}, {"messages": PLAIN}]
    with caplog.at_level(logging.INFO, logger="sftrainer"):
        _, stats = prepare(load(rows), tok, DataSettings(max_length=256, overwrite_cache=True))
    assert stats.empty_reasoning_turns == 2
    notes = [r.getMessage() for r in caplog.records if "empty reasoning block" in r.getMessage()]
    assert len(notes) == 1 and "2 assistant turn(s)" in notes[0] and "train_empty_reasoning=true" in notes[0]
    _, trained = prepare(
        load(rows), tok, DataSettings(max_length=256, overwrite_cache=True, train_empty_reasoning=True)
    )
    assert trained.empty_reasoning_turns == 0


def test_the_data_command_says_so(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "plain.jsonl"
    data.write_text(json.dumps({"messages": PLAIN}) + "\n" + json.dumps({"messages": WITH_REASONING}) + "\n")
    template = f"chat_template_path={rt.HERE / 'qwen3.jinja'}"
    assert main(["data", str(data), "--model", "builtin", "--rows", "2", template]) == 0
    out = capsys.readouterr().out
    assert "reasoning: 1 answer(s) without reasoning follow an empty reasoning block" in out
    assert "<think>\n\n</think>\n\n⟦It is 4.<|im_end|>⟧" in out  # the block shown, not marked trained
    assert "⟦<think>\nTwo and two make four.\n</think>\n\nIt is 4.<|im_end|>⟧" in out
    assert (
        main(["data", str(data), "--model", "builtin", "--rows", "1", template, "train_empty_reasoning=true"])
        == 0
    )
    out = capsys.readouterr().out
    assert "reasoning:" not in out and "⟦<think>\n\n</think>\n\nIt is 4.<|im_end|>⟧" in out
