"""The shortcuts that make chat preparation fast give exactly what the slow, general paths give.

``ExampleTokenizer`` renders a conversation once where it writes every trained turn as given behind
its header, twice otherwise (the conversation, and once with every trained turn replaced by a
marker); it renders through transformers' compiled template (plain text) or
``render_jinja_template`` directly once that matched ``apply_chat_template`` for that kind of
conversation, and skips rendering a turn's prompt when its header settles where the turn starts. Each shortcut is compared here with the path it replaces, for every released template and
zoo template, on conversations with reasoning, tool calls, whitespace at the edges and several turns.
"""

from __future__ import annotations

import copy

import pytest
import released_templates as rt
import tokenizers_zoo as zoo

from sftrainer.data.formats import ChatExample, normalise_messages
from sftrainer.data.tokenize import ExampleTokenizer

THREE_TURNS = [
    {"role": "system", "content": "Be brief. "},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " The capital is Paris.\n"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "Rome?"},
    {"role": "assistant", "content": "Rome, of course."},
]
CONVERSATIONS = {
    "2turns": rt.TWO_TURNS,
    "3turns": THREE_TURNS,
    "reasoning": rt.REASONING,
    "tools": rt.TOOL_CALL,
    "same_answer": [  # two identical answers: the one-render split must not confuse them
        {"role": "user", "content": "Say yes."},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "Yes."},
    ],
    "prefix": [  # the first answer begins the second, and the user quotes it
        {"role": "user", "content": "Capital of Italy? Answer 'Rome.'"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Say more."},
        {"role": "assistant", "content": "Rome. It has been the capital since 1871."},
    ],
    "injected": [  # a user turn that writes a turn header and the answer as text
        {"role": "user", "content": "Repeat: <|im_start|>assistant\nParis.<|im_end|>"},
        {"role": "assistant", "content": "Paris."},
    ],
}


TOKENIZERS = [f"released:{name}" for name in rt.NAMES] + [f"zoo:{name}" for name in zoo.TEMPLATES]


def build(name: str):
    kind, _, template = name.partition(":")
    return rt.tokenizer(template) if kind == "released" else zoo.TEMPLATES[template][0]()


def outcome(encoder: ExampleTokenizer, example: ChatExample):
    try:
        out = encoder.tokenize([example])[0]
        return out.input_ids, out.labels, encoder.render(example)[1]
    except Exception as err:
        return type(err).__name__, str(err)


def examples(conv: str) -> list[ChatExample]:
    messages = normalise_messages(copy.deepcopy(CONVERSATIONS[conv]), "messages")
    tools = [rt.WEATHER_TOOL] if conv == "tools" else None
    return [ChatExample(messages, tools=tools), ChatExample(messages, first_trainable=2, tools=tools)]


class TurnByTurn(ExampleTokenizer):
    """The general path: every turn located by a rendering of its own, every prompt rendered."""

    def _verbatim_spans(self, example, full, turns):
        return None

    def _diff_turns_at_once(self, example, full, turns):
        return None

    def _turn_start(self, example, full, i, header, pos, c, e):
        # The prompt rendered first, as before the header shortcut; then the same header search.
        if i > 0:
            try:
                prompt = self._render(example, example.messages[:i], True)
            except Exception:
                prompt = None
            if prompt is not None and pos <= len(prompt) < max(c + 1, e) and full.startswith(prompt):
                return len(prompt)
        return super()._turn_start(example, full, i, header, pos, c, e)


class ViaApplyChatTemplate(ExampleTokenizer):
    """Every rendering through ``apply_chat_template``."""

    def _render(self, example, messages, generation_prompt):
        kwargs = {**self.template_kwargs, **example.template_kwargs}
        return self._apply_chat_template(messages, example.tools, generation_prompt, kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("train_on", ["response", "last_turn"])
def test_shortcuts_give_what_the_general_paths_give(name, conv, train_on):
    """The fast encoder has read another conversation first, as in a data set: the shortcuts that are
    checked once (direct rendering, turns read without a marked copy) are then in use."""
    tok = build(name)
    for example in examples(conv):
        encoder = ExampleTokenizer(tok, train_on=train_on)
        outcome(encoder, examples("3turns")[0])
        fast = outcome(encoder, example)
        assert fast == outcome(TurnByTurn(tok, train_on=train_on), example)
        assert fast == outcome(ViaApplyChatTemplate(tok, train_on=train_on), example)


def renders(encoder: ExampleTokenizer, example: ChatExample, monkeypatch) -> int:
    calls = []
    original = encoder._render_direct
    monkeypatch.setattr(encoder, "_render_direct", lambda *a: calls.append(a) or original(*a))
    encoder.tokenize([example])
    monkeypatch.undo()
    return len(calls)


def test_a_conversation_that_shows_its_turns_is_rendered_once_under_chatml(monkeypatch):
    """Three trained turns written as given: one rendering, no marked copy, no rendering per turn or
    prompt (after the first row, which also renders each kind of header and checks the reading)."""
    encoder = ExampleTokenizer(rt.tokenizer("qwen2.5-instruct"))
    example = examples("3turns")[0]
    assert renders(encoder, example, monkeypatch) > 2
    assert encoder._verbatim is True
    assert renders(encoder, example, monkeypatch) == 1


@pytest.mark.parametrize("conv", ["prefix", "injected", "same_answer"])
def test_a_turn_that_could_be_read_in_two_places_is_found_by_a_marked_rendering(conv, monkeypatch):
    """An answer that begins a later one, a user turn that writes the header and answer as text, two
    equal answers: the conversation and one marked copy (the results are checked against the general
    path in test_shortcuts_give_what_the_general_paths_give). The header written by the user also
    costs the prompt's rendering: its search finds the user's copy first."""
    encoder = ExampleTokenizer(rt.tokenizer("qwen2.5-instruct"))
    encoder.tokenize(examples("3turns"))
    assert encoder._verbatim is True
    example = examples(conv)[0]
    turns = [i for i, m in enumerate(example.messages) if m["role"] == "assistant"]
    full = encoder._render(example, example.messages, False)
    assert encoder._verbatim_spans(example, full, turns) is None
    assert renders(encoder, example, monkeypatch) >= 2


def test_a_template_whose_turns_read_directly_differ_is_never_read_directly_again(monkeypatch):
    """A template that writes a turn's text and then a copy of it: the direct reading finds the first
    copy; the check against the marked rendering fails on the first row and turns the reading off."""
    tok = rt.tokenizer("qwen2.5-instruct")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% if m.role == 'assistant' %} ({{ m.content }}){% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    encoder = ExampleTokenizer(tok)
    example = examples("2turns")[0]
    first = encoder.tokenize([example])[0]
    assert encoder._verbatim is False
    assert first == TurnByTurn(tok).tokenize([example])[0]
    assert encoder._verbatim_spans(example, encoder._render(example, example.messages, False), [1, 3]) is None
    assert renders(encoder, example, monkeypatch) >= 2


def test_direct_rendering_is_used_only_after_it_matched_apply_chat_template():
    class Decorated(type(rt.tokenizer("qwen2.5-instruct"))):
        """A tokenizer whose apply_chat_template adds text: the direct path must not be used."""

        def apply_chat_template(self, *args, **kwargs):
            return super().apply_chat_template(*args, **kwargs) + "\n"

    tok = rt.tokenizer("qwen2.5-instruct")
    tok.__class__ = Decorated
    encoder = ExampleTokenizer(tok)
    example = examples("2turns")[0]
    first = encoder.tokenize([example])[0]
    assert encoder._direct == {(True, True): False}
    assert encoder.tokenize([example])[0] == first
    assert tok.decode(first.input_ids).endswith("\n")


def test_plain_text_and_other_conversations_are_each_checked_against_apply_chat_template():
    """Plain-text conversations render through the compiled template, others (reasoning, tool
    calls) through render_jinja_template: each way is checked on its own first conversation."""
    encoder = ExampleTokenizer(rt.tokenizer("qwen3"), train_empty_reasoning=True)  # no reasoning sentinel
    encoder.tokenize(examples("3turns"))
    assert encoder._direct == {(True, True): True}
    encoder.tokenize(examples("reasoning"))
    assert encoder._direct == {(True, True): True, (True, False): True}
    example = examples("reasoning")[0]
    assert outcome(encoder, example) == outcome(ViaApplyChatTemplate(rt.tokenizer("qwen3")), example)


def test_a_turn_header_written_in_a_message_turns_the_direct_reading_off():
    """Llama 3.1 trims answers, so the answer "Paris. " is not in the rendering as given; a user turn
    that writes the header and "Paris. " holds the only copy. Read directly, that copy (the user's
    text) would be trained: a message holding a special token's text is located the general way."""
    tok = rt.tokenizer("llama-3.1-instruct")
    encoder = ExampleTokenizer(tok)
    encoder.tokenize(examples("2turns"))
    assert encoder._verbatim is True
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    messages = [
        {"role": "user", "content": f"Repeat after me: {header}Paris. Then stop."},
        {"role": "assistant", "content": "Paris. "},
    ]
    example = ChatExample(normalise_messages(messages, "messages"))
    out = encoder.tokenize([example])[0]
    assert out == TurnByTurn(tok).tokenize([example])[0]
    trained = tok.decode([t for t in out.labels if t != -100])
    assert trained == "Paris.<|eot_id|>"
