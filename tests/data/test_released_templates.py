"""Loss masks under the chat templates of released models (``chat_templates/``, see its README).

For every template and three conversations (system + one turn, two turns, a tool-call conversation)
the trained spans are exactly the assistant turns, tool calls included, each ending with the
family's end-of-turn or EOS token; no system, user or tool-result text is trained; and the row's
tokens are the rendered conversation itself. Conversations a template refuses (Gemma-2 has no
system role, Hermes-2-Pro's tool template needs tools, most templates cannot show tool calls) are
listed here with the reason, and must be reported for that reason, never trained wrongly.
"""

from __future__ import annotations

import json

import inference_oracle as oracle
import pytest
import released_templates as rt
import tokenizers_zoo as zoo

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.formats import ChatExample, normalise_messages, split_turns
from sftrainer.data.tokenize import ExampleTokenizer
from sftrainer.errors import RowError, TemplateError

CONVERSATIONS = {"system+1": rt.SYSTEM_ONE_TURN, "2turns": rt.TWO_TURNS, "tools": rt.TOOL_CALL}
TOOL_TEMPLATES = {  # templates that render assistant tool calls
    "deepseek-r1-distill-qwen",
    "gpt-oss",
    "hermes-2-pro-tool-use",
    "llama-3.1-instruct",
    "mistral-7b-instruct-v0.3",
    "qwen2.5-instruct",
    "qwen3",
}
# (template, conversation) -> words of the error the template's refusal must be reported with
REFUSED = {
    ("gemma-2-it", "system+1"): "System role not supported",
    ("mistral-7b-instruct-v0.1", "system+1"): "roles must alternate",
    **{
        (name, "tools"): "tool"
        for name in rt.TABLED
        if name not in TOOL_TEMPLATES and name not in ("gemma-2-it", "gemma-3-it", "command-r")
    },
    # no tool role at all: the template's own check fires
    ("gemma-2-it", "tools"): "roles must alternate",
    ("gemma-3-it", "tools"): "roles must alternate",
    ("command-r", "tools"): "roles must alternate",
    ("llama-2-chat", "tools"): "roles must alternate",
    ("mistral-7b-instruct-v0.1", "tools"): "roles must alternate",
}
# Tokens that may end a trained turn besides the family's end-of-turn and EOS tokens.
EXTRA_ENDS = {"gpt-oss": ("<|call|>",)}  # harmony ends a tool call with <|call|>


def example(name: str, conv: str) -> ChatExample:
    tools = [rt.WEATHER_TOOL] if conv == "tools" or name == "hermes-2-pro-tool-use" else None
    return ChatExample(normalise_messages(CONVERSATIONS[conv], "messages"), tools=tools)


def expected_pieces(message: dict) -> list[str]:
    """Text that must be inside the trained span of an assistant message."""
    if "tool_calls" in message:
        call = message["tool_calls"][0]["function"]
        return [call["name"], *call["arguments"].values()]
    return [message["content"]]


def untrained_pieces(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] != "assistant"]


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("name", rt.TABLED)
def test_trained_spans_are_exactly_the_assistant_turns(name, conv):
    tok = rt.tokenizer(name)
    ex = example(name, conv)
    encoder = ExampleTokenizer(tok)
    if (name, conv) in REFUSED:
        with pytest.raises(RowError, match=REFUSED[name, conv]):
            encoder.tokenize([ex])
        return
    rows = encoder.tokenize([ex])
    spans = [s for row in rows for s in zoo.trained_spans(tok, row.input_ids, row.labels)]
    answers = [m for m in ex.messages if m["role"] == "assistant"]
    assert len(spans) == len(answers), spans
    info = rt.INDEX[name]
    ends = (info["end_of_turn"], info["eos_token"], *EXTRA_ENDS.get(name, ()))
    for span, message in zip(spans, answers):
        assert span.endswith(ends), (span, ends)
        for piece in expected_pieces(message):
            assert piece in span, (piece, span)
        for piece in untrained_pieces(ex.messages):
            assert piece not in span, (piece, span)
    # Masking changes labels, never text: the row is the rendered conversation (one BOS at most added).
    # (transformers drops a null content; templates that read it anyway get empty text, as in sftrainer)
    messages = [{**m, "content": m["content"] or ""} for m in ex.messages]
    rendered = tok.apply_chat_template(messages, tools=ex.tools, tokenize=False)
    # A conversation whose turns cannot share a row (falcon: its generation prompt ends with a space
    # that the conversation tokenizes into the answer's first token) gives a row per turn: the last holds it all.
    text = tok.decode(rows[-1].input_ids)
    assert text == rendered or (info["bos_token"] and text == info["bos_token"] + rendered)


def test_every_template_is_covered_with_its_provenance():
    assert len(rt.NAMES) == 81 and set(rt.TABLED) <= set(rt.NAMES)
    for name in rt.NAMES:
        assert rt.template(name)  # the sha256 in index.json matches the copied file
        assert rt.INDEX[name]["source"]


@pytest.mark.slow
@pytest.mark.parametrize("last", [False, True], ids=["result-follows", "call-is-last"])
@pytest.mark.parametrize("name", rt.NAMES)
def test_tool_calls_are_trained_and_tool_results_never(name, last):
    """A call, its result and the answer, with the tools listed: every template that can show the
    call trains exactly what inference_oracle states (the call through the token that ends a call,
    the answer through its end-of-turn), never the result; a template that cannot show it refuses
    the row by the turn's name."""
    tok = rt.tokenizer(name)
    messages = json.loads(json.dumps(rt.TOOL_CALL[:2] if last else rt.TOOL_CALL))
    kwargs = dict(rt.INDEX[name].get("template_kwargs") or {})
    tools = [rt.WEATHER_TOOL]
    example = ChatExample(normalise_messages(json.loads(json.dumps(messages)), "messages"), tools=tools)
    try:
        rows = ExampleTokenizer(tok, template_kwargs=kwargs).tokenize([example])
    except (RowError, TemplateError) as err:
        try:
            shown = "get_weather" in oracle.render(tok, messages, tools=tools, **kwargs)
        except Exception:
            shown = False  # the template raises on this conversation (Kimi K2 appends to a list)
        assert not shown or "tool call" in str(err), err
        return
    info = rt.INDEX[name]
    eot = info["end_of_turn"] if (info["end_of_turn"] or "") in rt.template(name) else tok.eos_token
    stops = tuple(info.get("stop_tokens") or ())
    full, turns = oracle.expected_turns(tok, messages, eot, stops, tools=tools, **kwargs)
    oracle.check_chat_rows(tok, rows, full, turns)
    trained = [tok.decode(r.input_ids[s:e]) for r in rows for s, e in oracle.trained_spans(r.labels)]
    assert "get_weather" in trained[0] and not any("celsius" in span for span in trained)


def test_tool_results_and_tool_schemas_are_never_trained():
    tok = rt.tokenizer("qwen2.5-instruct")
    out = ExampleTokenizer(tok).tokenize([example("qwen2.5-instruct", "tools")])[0]
    trained = tok.decode([t for t, label in zip(out.input_ids, out.labels) if label != IGNORE_INDEX])
    untrained = tok.decode([t for t, label in zip(out.input_ids, out.labels) if label == IGNORE_INDEX])
    assert '{"celsius": 21}' in untrained and "<tool_response>" in untrained
    assert "Get the current weather" in untrained  # the tools list in the system prompt
    assert '"celsius"' not in trained and "<tools>" not in trained
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is 21 degrees in Paris.<|im_end|>"
    )


# ---- reasoning -------------------------------------------------------------------------------


def reasoning_spans(name: str, messages: list[dict], **kwargs) -> tuple[list[str], int]:
    tok = rt.tokenizer(name)
    encoder = ExampleTokenizer(tok, **kwargs)
    ex = ChatExample(normalise_messages(messages, "messages"))
    _, rewritten = encoder.render(ex)
    out = encoder.tokenize([ex])[0]
    return zoo.trained_spans(tok, out.input_ids, out.labels), rewritten


def test_reasoning_generation_prompt_opens_a_think_block_the_conversation_lacks():
    """DeepSeek-R1-Distill prompts with '<｜Assistant｜><think>\\n'; a finished conversation keeps only
    the answer after </think>. Every turn is still trained (it used to refuse every row)."""
    messages = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>Add them.</think>It is 4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "<think>Add again.</think>It is 6."},
    ]
    spans, rewritten = reasoning_spans("deepseek-r1-distill-qwen", messages)
    assert spans == ["It is 4.<｜end▁of▁sentence｜>", "It is 6.<｜end▁of▁sentence｜>"]
    assert rewritten == 2  # the template drops the reasoning of every turn: counted, and warned about
    last, _ = reasoning_spans("deepseek-r1-distill-qwen", messages, train_on="last_turn")
    assert last == ["It is 6.<｜end▁of▁sentence｜>"]


def test_qwen3_drops_past_reasoning_and_split_turns_keeps_it():
    spans, rewritten = reasoning_spans("qwen3", rt.REASONING)
    assert spans == [
        "The capital is Paris.<|im_end|>",  # a past turn: Qwen3 renders it without its reasoning
        "<think>\nItaly: Rome.\n</think>\n\nRome, of course.<|im_end|>",
    ]
    assert rewritten == 1
    tok = rt.tokenizer("qwen3")
    encoder = ExampleTokenizer(tok)
    per_turn = split_turns(ChatExample(normalise_messages(rt.REASONING, "messages")))
    assert [encoder.render(ex)[1] for ex in per_turn] == [0, 0]
    outs = encoder.tokenize(per_turn)
    assert [zoo.trained_spans(tok, o.input_ids, o.labels) for o in outs] == [
        ["<think>\nFrance, so Paris.\n</think>\n\nThe capital is Paris.<|im_end|>"],
        ["<think>\nItaly: Rome.\n</think>\n\nRome, of course.<|im_end|>"],
    ]
    # each example's history is what the model saw when answering (the first answer without reasoning)
    assert "France, so Paris." not in tok.decode(outs[1].input_ids)


def test_qwen3_enable_thinking_false_from_config_and_from_the_row():
    """With thinking off, the generation prompt holds an empty think block: it is prompt, not trained.
    With thinking on, the block the template writes empty is not trained either (tests/data/test_reasoning.py),
    unless train_empty_reasoning asks for it."""
    messages = rt.TWO_TURNS[:2]
    on, _ = reasoning_spans("qwen3", messages)
    assert on == ["The capital is Paris.<|im_end|>"]
    kept, _ = reasoning_spans("qwen3", messages, train_empty_reasoning=True)
    assert kept == ["<think>\n\n</think>\n\nThe capital is Paris.<|im_end|>"]
    off, _ = reasoning_spans("qwen3", messages, template_kwargs={"enable_thinking": False})
    assert off == ["The capital is Paris.<|im_end|>"]
    tok = rt.tokenizer("qwen3")
    row = ChatExample(normalise_messages(messages, "messages"), template_kwargs={"enable_thinking": False})
    out = ExampleTokenizer(tok).tokenize([row])[0]
    assert zoo.trained_spans(tok, out.input_ids, out.labels) == off


def test_gpt_oss_trains_analysis_and_final_channels_of_the_last_turn():
    spans, _ = reasoning_spans("gpt-oss", rt.REASONING)
    assert spans[-1] == (
        "<|channel|>analysis<|message|>Italy: Rome.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Rome, of course.<|return|>"
    )


def test_mistral_v03_moves_the_tools_into_the_last_user_turn():
    """History rewritten: Mistral v0.3 puts [AVAILABLE_TOOLS] before the last [INST] only, so the
    prompt of the first answer rendered alone is not a prefix of the conversation (this made every
    such row fail before). Every turn is located all the same; the tools list is never trained."""
    tok = rt.tokenizer("mistral-7b-instruct-v0.3")
    ex = ChatExample(normalise_messages(rt.TWO_TURNS, "messages"), tools=[rt.WEATHER_TOOL])
    first_prompt = tok.apply_chat_template(
        ex.messages[:1], tools=ex.tools, add_generation_prompt=True, tokenize=False
    )
    full = tok.apply_chat_template(ex.messages, tools=ex.tools, tokenize=False)
    assert not full.startswith(first_prompt)
    out = ExampleTokenizer(tok).tokenize([ex])[0]
    assert zoo.trained_spans(tok, out.input_ids, out.labels) == [
        " The capital is Paris. </s>",
        " Rome, of course. </s>",
    ]
    untrained = tok.decode([t for t, label in zip(out.input_ids, out.labels) if label == IGNORE_INDEX])
    assert "[AVAILABLE_TOOLS]" in untrained and "get_weather" in untrained


@pytest.mark.parametrize(
    "name", ["qwen2.5-instruct", "llama-3.1-instruct", "gemma-3-it", "phi-3-mini-instruct"]
)
def test_conversation_starting_with_the_assistant_does_not_train_the_preamble(name):
    """Qwen2.5 adds a default system prompt, Llama-3.1 a date header: context, not the answer."""
    messages = [
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say bye."},
        {"role": "assistant", "content": "Bye."},
    ]
    tok = rt.tokenizer(name)
    try:
        out = ExampleTokenizer(tok).tokenize([ChatExample(normalise_messages(messages, "messages"))])[0]
    except RowError as err:  # a template may refuse to start with the assistant; it must say so
        assert "alternate" in str(err)
        return
    spans = zoo.trained_spans(tok, out.input_ids, out.labels)
    eot = rt.INDEX[name]["end_of_turn"]
    assert spans == [f"Hello, how can I help?{eot}", f"Bye.{eot}"]


def test_a_template_that_cannot_show_a_turn_names_the_turn():
    tok = rt.tokenizer("chatml-openhermes")
    tok.chat_template = (  # drops every assistant turn but the last
        "{%- for m in messages -%}{%- if m['role'] != 'assistant' or loop.last -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}{%- endfor -%}"
    )
    with pytest.raises(TemplateError) as err:
        ExampleTokenizer(tok).tokenize([ChatExample(normalise_messages(rt.TWO_TURNS, "messages"))])
    assert err.value.field == "messages[1]" and "split_turns=true" in str(err.value)
