"""Token-accurate masks with any chat template, no ``{% generation %}`` markers needed.

Every template in ``tokenizers_zoo.TEMPLATES`` (ChatML/Qwen2, Llama-3, Gemma, Llama-2/Mistral, Phi-3,
one with generation markers, one without any end-of-turn token, and sftrainer's default template
on tokenizers with and without BOS) is checked on conversations with two and three assistant turns.
"""

from __future__ import annotations

import pytest
import tokenizers_zoo as zoo

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.formats import ChatExample
from sftrainer.data.tokenize import ExampleTokenizer
from sftrainer.errors import RowError
from sftrainer.model import DEFAULT_CHAT_TEMPLATE

TEMPLATES = sorted(zoo.TEMPLATES)
CONVERSATIONS = {"system+2": zoo.CONVERSATION, "3turns": zoo.THREE_TURNS}


def tokenize(tok, messages, **kwargs):
    return ExampleTokenizer(tok, **kwargs).tokenize([ChatExample(messages)])[0]


def trained_spans(tok, messages, **kwargs) -> list[str]:
    """The trained spans of every row the conversation gives, in order."""
    rows = ExampleTokenizer(tok, **kwargs).tokenize([ChatExample(messages)])
    return [span for row in rows for span in zoo.trained_spans(tok, row.input_ids, row.labels)]


def with_bos(tok, ids: list[int]) -> list[int]:
    """``ids`` as the model sees them: one BOS first when the tokenizer puts BOS before text."""
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("x")["input_ids"][:1] == [bos]
    return [bos, *ids] if adds_bos and ids[:1] != [bos] else ids


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name", TEMPLATES)
def test_trained_text_is_each_assistant_turn_plus_end_of_turn(name, conv):
    factory, end_of_turn = zoo.TEMPLATES[name]
    tok = factory()
    messages = CONVERSATIONS[conv]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(answers) >= 2
    assert trained_spans(tok, messages) == [a + end_of_turn for a in answers]


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_tokens_are_the_rendered_prompt_alone(name):
    """Up to the first answer, the tokens are exactly those of the prompt rendered with the generation
    prompt and tokenized alone: nothing merged across the boundary, no prompt tail lost."""
    tok = zoo.TEMPLATES[name][0]()
    messages = zoo.CONVERSATION
    out = tokenize(tok, messages)
    prompt = tok.apply_chat_template(messages[:2], add_generation_prompt=True, tokenize=False)
    prompt_ids = with_bos(tok, tok(prompt, add_special_tokens=False)["input_ids"])
    first_trained = next(i for i, label in enumerate(out.labels) if label != IGNORE_INDEX)
    assert out.input_ids[:first_trained] == prompt_ids


@pytest.mark.parametrize("name", sorted(set(TEMPLATES) - {"plain", "plain_metaspace"}))
def test_tokens_are_those_of_the_whole_rendered_conversation(name):
    """With an end-of-turn token in the template, the row is the rendered conversation tokenized in one
    go (plus BOS once): masking changes labels, never tokens."""
    tok = zoo.TEMPLATES[name][0]()
    for messages in CONVERSATIONS.values():
        out = tokenize(tok, messages)
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert out.input_ids == with_bos(tok, tok(rendered, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("name", TEMPLATES)
def test_exactly_one_bos(name):
    tok = zoo.TEMPLATES[name][0]()
    out = tokenize(tok, zoo.CONVERSATION)
    bos = tok.bos_token_id
    adds_bos = bos is not None and tok("x")["input_ids"][:1] == [bos]
    if name == "llama2":  # the template puts BOS before each [INST] (2 here); the first is not doubled
        assert out.input_ids[:2] != [bos, bos] and out.input_ids[0] == bos
        assert out.input_ids.count(bos) == 2
    elif adds_bos:
        assert out.input_ids[0] == bos and out.input_ids.count(bos) == 1
    elif bos is not None:
        assert bos not in out.input_ids


def test_template_that_emits_bos_on_a_tokenizer_that_adds_bos():
    # Llama-3 and Gemma templates start with {{ bos_token }} and their tokenizers also add BOS.
    for tok in (zoo.llama3(), zoo.gemma()):
        assert tok.chat_template.lstrip("{- ").startswith("bos_token")
        assert tok("x")["input_ids"][0] == tok.bos_token_id
        out = tokenize(tok, zoo.CONVERSATION)
        assert out.input_ids[:2] != [tok.bos_token_id] * 2
        assert out.input_ids.count(tok.bos_token_id) == 1


def test_template_without_end_of_turn_gets_a_trained_eos():
    """Each answer gets a trained EOS. The template writes none, so a later turn's prompt (the
    conversation as inference renders it) cannot hold that EOS: each turn is a row of its own, whose
    prompt is exactly what inference gives."""
    tok = zoo.plain()
    assert "eos_token" not in tok.chat_template
    rows = ExampleTokenizer(tok).tokenize([ChatExample(zoo.THREE_TURNS)])
    eos = tok.eos_token_id
    assert len(rows) == 3
    for k, row in enumerate(rows):
        turn = 2 * k + 1
        prompt = tok.apply_chat_template(zoo.THREE_TURNS[:turn], add_generation_prompt=True, tokenize=False)
        start = row.labels.index(next(label for label in row.labels if label != IGNORE_INDEX))
        assert row.input_ids[:start] == tok(prompt, add_special_tokens=False)["input_ids"]
        assert row.input_ids.count(eos) == 1 and row.labels[row.input_ids.index(eos)] == eos
        answer = zoo.THREE_TURNS[turn]["content"]
        assert tok.decode(row.input_ids).startswith(prompt + answer + "<|endoftext|>")


@pytest.mark.parametrize("name", ["plain", "plain_metaspace"])
def test_plain_template_boundary_is_exact_although_bpe_would_merge_it(name):
    """'Assistant: ' + 'The' would be one token ' The' (byte-level) or '▁The' (Metaspace) across the
    prompt/answer boundary. The prompt keeps its own tokens and no space is lost or added."""
    factory, eos = zoo.TEMPLATES[name]
    tok = factory()
    text = tok.apply_chat_template(zoo.NO_SYSTEM[:2], tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    boundary = text.index("The capital")
    assert any(s < boundary < e for s, e in enc["offset_mapping"])  # the merge really happens
    out = tokenize(tok, zoo.NO_SYSTEM[:2])
    prompt_ids = tok(text[:boundary])["input_ids"]  # BOS too, where the tokenizer adds it
    assert out.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(out.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    bos = [tok.bos_token_id] if name == "plain_metaspace" else []
    assert out.input_ids[: len(bos)] == bos
    assert tok.decode(out.input_ids[len(bos) :]) == text[:boundary] + f"The capital is Paris.{eos}\n"


def test_phi3_final_eos_is_not_part_of_the_last_turn():
    """Phi-3 ends a finished conversation with EOS after the last <|end|>: the last turn is
    trained like the others (content + <|end|>), the trailing EOS is context."""
    tok = zoo.phi3()
    out = tokenize(tok, zoo.THREE_TURNS)
    assert tok.convert_ids_to_tokens(out.input_ids[-3:]) == ["<|end|>", "\n", "<|endoftext|>"]
    assert out.labels[-3:] == [tok.convert_tokens_to_ids("<|end|>"), IGNORE_INDEX, IGNORE_INDEX]


def test_generation_markers_agree_with_transformers_assistant_mask():
    tok = zoo.chatml_generation()
    out = tokenize(tok, zoo.THREE_TURNS)
    ref = tok.apply_chat_template(
        zoo.THREE_TURNS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert out.input_ids == ref["input_ids"]
    assert [label != IGNORE_INDEX for label in out.labels] == [bool(m) for m in ref["assistant_masks"]]


def test_default_template_is_used_for_a_tokenizer_without_one():
    from sftrainer.model import prepare_tokenizer

    with_bos_tok = zoo.build("byte_level", bos="<s>", eos="</s>", add_bos=True)
    assert with_bos_tok.chat_template is None
    with_bos_tok = prepare_tokenizer(with_bos_tok)  # a copy: the caller's tokenizer is left alone
    assert with_bos_tok.chat_template == DEFAULT_CHAT_TEMPLATE.replace("{{ bos }}", "{{ bos_token }}")
    out = tokenize(with_bos_tok, zoo.NO_SYSTEM)
    text = with_bos_tok.decode(out.input_ids)
    assert text.startswith("<s>### User:\nWhat is the capital of France?\n\n### Assistant:\nThe capital")
    assert out.input_ids.count(with_bos_tok.bos_token_id) == 1

    no_bos_tok = prepare_tokenizer(zoo.build("metaspace", bos=None, eos="</s>"))
    assert "bos_token" not in no_bos_tok.chat_template
    assert no_bos_tok.decode(tokenize(no_bos_tok, zoo.NO_SYSTEM).input_ids).startswith("### User:")


@pytest.mark.parametrize("name", TEMPLATES)
def test_last_turn_and_all(name):
    factory, end_of_turn = zoo.TEMPLATES[name]
    tok = factory()
    last = tokenize(tok, zoo.THREE_TURNS, train_on="last_turn")
    assert zoo.trained_spans(tok, last.input_ids, last.labels) == ["The Tiber." + end_of_turn]
    every = tokenize(tok, zoo.THREE_TURNS, train_on="all")
    rendered = tok.apply_chat_template(zoo.THREE_TURNS, tokenize=False).rstrip()
    # One span: the whole conversation (a BOS sftrainer inserts and trailing whitespace excepted),
    # with EOS appended where the template has no end-of-turn token of its own.
    expected = rendered + (end_of_turn if name.startswith("plain") else "")
    assert zoo.trained_spans(tok, every.input_ids, every.labels) == [expected]


# ---- templates that rewrite history ---------------------------------------------------------

# Rewrites history: an earlier answer is shortened once a later turn follows (like templates that
# drop the reasoning of past turns).
REWRITES_HISTORY = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and not loop.last -%}{{ '<|im_start|>assistant\\n' + m['content'][:3] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_template_that_rewrites_history_trains_the_finished_conversation_and_counts_it():
    """Each turn is trained as the finished conversation renders it (what the template says a
    conversation is); the rewritten turn is counted, and split_turns trains it as the model saw it."""
    tok = zoo.chatml()
    tok.chat_template = REWRITES_HISTORY
    encoder = ExampleTokenizer(tok)
    _, rewritten = encoder.render(ChatExample(zoo.NO_SYSTEM))
    assert rewritten == 1
    assert trained_spans(tok, zoo.NO_SYSTEM) == [
        "The<|im_end|>",
        "Rome, of course.<|im_end|>",
    ]
    rows, stats = zoo.prep([{"messages": zoo.NO_SYSTEM}], tok)
    assert stats.rewritten_turns == 1 and "split_turns=true" in stats.rewritten_warning()
    rows, stats = zoo.prep([{"messages": zoo.NO_SYSTEM}], tok, split_turns=True)
    assert (stats.rows, stats.kept, stats.rewritten_turns) == (2, 2, 0)
    assert [zoo.trained_spans(tok, r["input_ids"], r["labels"]) for r in rows] == [
        ["The capital is Paris.<|im_end|>"],
        ["Rome, of course.<|im_end|>"],
    ]


def test_template_that_rejects_a_conversation_names_it():
    tok = zoo.chatml()
    tok.chat_template = (
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
        "{{ raise_exception('System role not supported') }}{%- endif -%}{{ m['content'] }}{%- endfor -%}"
    )
    with pytest.raises(RowError) as err:
        tokenize(tok, zoo.CONVERSATION)
    assert "the chat template rejected this conversation" in str(err.value)
    assert "System role not supported" in str(err.value)


# Shows every answer without its reasoning, in every turn (like templates of reasoning models that
# keep only the text after </think>): consistent history, so every turn is still located.
DROPS_REASONING = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'].split('</think>')[-1] if m['role'] == 'assistant' else m['content'] -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def test_template_that_rewrites_every_answer_the_same_way():
    tok = zoo.chatml()
    tok.chat_template = DROPS_REASONING
    messages = [dict(m) for m in zoo.NO_SYSTEM]
    messages[1]["content"] = "<think>France, so Paris.</think>The capital is Paris."
    messages[3]["content"] = "<think>Italy.</think>Rome, of course."
    for train_on, expected in [
        ("response", ["The capital is Paris.<|im_end|>", "Rome, of course.<|im_end|>"]),
        ("last_turn", ["Rome, of course.<|im_end|>"]),
    ]:
        out = tokenize(tok, messages, train_on=train_on)
        assert zoo.trained_spans(tok, out.input_ids, out.labels) == expected


def test_a_turn_header_token_does_not_end_the_previous_turn():
    """With no end-of-turn token, the next header's '<|im_start|>' is not trained as one: EOS is added."""
    tok = zoo.chatml()
    tok.chat_template = (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )
    assert trained_spans(tok, zoo.NO_SYSTEM) == [
        "The capital is Paris.<|im_end|>",  # <|im_end|> is this tokenizer's EOS, added and trained
        "Rome, of course.<|im_end|>",
    ]
