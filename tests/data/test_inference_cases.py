"""The cases where a prepared row used to differ from what inference gives, one test each.

Each failed before sftrainer's rows were built to match inference (``sftrainer/data/encode.py``):
with released tokenizers (``tokenizers/``) and released chat templates (``chat_templates/``), the
prompt tokens must be the ids the model is given at inference for that prompt, and the trained
tokens exactly each answer and the token that ends its turn (checked by ``inference_oracle``).
"""

from __future__ import annotations

import copy
import json

import inference_oracle as oracle
import pytest
import real_tokenizers
import released_templates as rt
import tokenizers_zoo as zoo

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.formats import ChatExample, PairExample, normalise_messages
from sftrainer.data.tokenize import ExampleTokenizer

MISTRAL, LLAMA3, GPT2 = "mistral-7b-v0.1", "llama-3.1-instruct", "gpt-2-gguf"


def native(tokenizer: str, template: str | None = None):
    """A released tokenizer as released, with a released template."""
    return real_tokenizers.templated(
        real_tokenizers.with_tokens(tokenizer), template and rt.template(template)
    )


def rows_of(tok, messages, tools=None, **kwargs):
    example = ChatExample(normalise_messages(copy.deepcopy(messages), "messages"), tools=tools)
    return ExampleTokenizer(tok, **kwargs).tokenize([example])


def trained(tok, rows) -> list[list[str]]:
    """Each trained span's tokens."""
    out = []
    for row in rows:
        for start, end in oracle.trained_spans(row.labels):
            out.append(tok.convert_ids_to_tokens(row.input_ids[start:end]))
    return out


def texts(tok, rows) -> list[str]:
    return [span for row in rows for span in zoo.trained_spans(tok, row.input_ids, row.labels)]


def check(tok, messages, name, rows, tools=None):
    info = rt.INDEX[name]
    eot = info["end_of_turn"] if (info["end_of_turn"] or "") in rt.template(name) else tok.eos_token
    full, turns = oracle.expected_turns(tok, messages, eot, tuple(info.get("stop_tokens") or ()), tools=tools)
    oracle.check_chat_rows(tok, rows, full, turns)


# ---- 1. a space the data never has ------------------------------------------------------------


@pytest.mark.parametrize(
    "answer", ['{"a": 1}', "[1, 2]", "<b>bold</b>", "(yes)", ": done", ". End", ", then"]
)
def test_mistral_answer_after_inst_gets_no_phantom_space(answer):
    """Mistral v0.1's template renders '[/INST]' + answer with no space; SentencePiece merges ']{'
    into one token, and tokenizing the answer on its own put a '▁' before it."""
    tok = native(MISTRAL, "mistral-7b-instruct-v0.1")
    messages = [{"role": "user", "content": "Give it"}, {"role": "assistant", "content": answer}]
    rows = rows_of(tok, messages)
    check(tok, messages, "mistral-7b-instruct-v0.1", rows)
    first = trained(tok, rows)[0][0]
    assert not first.startswith("▁"), trained(tok, rows)


def test_mistral_two_turns_prompt_of_the_second_turn_is_inference():
    tok = native(MISTRAL, "mistral-7b-instruct-v0.1")
    messages = [
        {"role": "user", "content": "Give JSON"},
        {"role": "assistant", "content": '{"a": 1}'},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "(no)"},
    ]
    rows = rows_of(tok, messages)
    check(tok, messages, "mistral-7b-instruct-v0.1", rows)
    prompt = tok.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=False)
    last = rows[-1]
    start = oracle.trained_spans(last.labels)[-1][0]
    assert last.input_ids[:start] == oracle.inference_ids(tok, prompt)


def test_raw_pair_cut_mid_word_trains_the_rest_of_the_word():
    """'ret' + 'urn x + 1': the completion's first token is 'urn', not '▁' + 'urn' ("ret urn")."""
    tok = real_tokenizers.load(MISTRAL)
    prompt, completion = "def foo(x):\n    ret", "urn x + 1"
    rows = ExampleTokenizer(tok).tokenize([PairExample(prompt, completion)])
    oracle.check_pair_row(tok, rows, prompt, completion)
    assert trained(tok, rows)[0][:2] == ["urn", "▁x"]


# ---- 2. prompt tokens that inference never sees --------------------------------------------------


@pytest.mark.slow
def test_llama3_prompt_keeps_the_whole_word_inference_sees():
    """ignore_merges: 'olsun' alone is one token; followed by 'lar' BPE splits it. The prompt keeps
    the token inference gives it."""
    tok = real_tokenizers.load(LLAMA3)
    prompt, completion = "Complete the Turkish word: olsun", "lar"
    rows = ExampleTokenizer(tok).tokenize([PairExample(prompt, completion)])
    oracle.check_pair_row(tok, rows, prompt, completion)
    row = rows[0]
    start = oracle.trained_spans(row.labels)[0][0]
    assert tok.convert_ids_to_tokens(row.input_ids[start - 1 : start]) == ["Ġolsun"]
    assert trained(tok, rows) == [["lar", "<|eot_id|>"]]


def test_gpt2_prompt_keeps_its_newline_run():
    """GPT-2 keeps "\\n\\n" as one token only when no text follows: the prompt alone ends 'ĊĊ'."""
    tok = real_tokenizers.load(GPT2)
    prompt, completion = "Question: what is 2+2?\n\n", "Answer: 4"
    rows = ExampleTokenizer(tok).tokenize([PairExample(prompt, completion)])
    oracle.check_pair_row(tok, rows, prompt, completion)
    start = oracle.trained_spans(rows[0].labels)[0][0]
    assert tok.convert_ids_to_tokens(rows[0].input_ids[start - 1 : start]) == ["ĊĊ"]
    assert trained(tok, rows) == [["Answer", ":", "Ġ4", "<|endoftext|>"]]


# ---- 3. EOS after an answer that ends in an added token -----------------------------------------

NO_END_OF_TURN = {
    "chatml-without-im-end": (
        "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    ),
    "vicuna-style": (
        "{%- for m in messages -%}{{ m['role'] | upper + ': ' + m['content'] + '\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    ),
}


@pytest.mark.parametrize("ending", ["</tool_call>", "</think>"])
@pytest.mark.parametrize("template", sorted(NO_END_OF_TURN))
def test_an_answer_ending_in_an_added_token_still_gets_eos(template, ending):
    tok = zoo.build(
        "byte_level",
        bos=None,
        eos="<|endoftext|>",
        specials=("<|im_start|>", "<tool_call>", "</tool_call>", "<think>", "</think>"),
        chat_template=NO_END_OF_TURN[template],
    )
    messages = [
        {"role": "user", "content": "Call it"},
        {"role": "assistant", "content": f"<tool_call>x{ending}"},
    ]
    rows = rows_of(tok, messages)
    glue = " " if template == "vicuna-style" else ""  # 'ASSISTANT:' + ' ' + answer: the model writes it
    assert texts(tok, rows) == [f"{glue}<tool_call>x{ending}<|endoftext|>"]


# ---- 4. marker collisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer", ["ok \ufdd1", "\ufdd0yes", "\ufdd0\ufdd1", "".join(map(chr, range(0xFDD0, 0xFDEE)))]
)
@pytest.mark.parametrize(
    "name", ["llama-3.1-instruct", "qwen2.5-instruct", "gemma-3-it", "phi-3-mini-instruct"]
)
def test_answers_holding_the_turn_markers_characters_are_trained_whole(name, answer):
    """The turn marker is built from noncharacters the conversation does not hold: an answer ending
    in U+FDD1 keeps it, and gets no EOS in the middle of the row."""
    tok = rt.tokenizer(name)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}]
    rows = rows_of(tok, messages)
    check(tok, messages, name, rows)
    assert texts(tok, rows) == [answer + rt.INDEX[name]["end_of_turn"]]


# ---- 5. tool responses inside the assistant's turn ----------------------------------------------


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("gemma-4-it", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><|tool_response>'),
        # the interleaved variant gives the result a turn of its own: the call ends with <turn|>
        ("gemma-4-it-interleaved", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|><turn|>'),
    ],
)
def test_gemma4_tool_response_inside_the_model_turn_is_not_trained(name, call):
    """Gemma 4 writes '<|tool_call>...<tool_call|><|tool_response>response...<tool_response|>answer'
    in one model turn: the call and the answer are trained, the tool's response is not."""
    tok = rt.tokenizer(name)
    messages = json.loads(json.dumps(rt.TOOL_CALL))
    rows = rows_of(tok, messages, tools=[rt.WEATHER_TOOL])
    assert texts(tok, rows) == [call, "It is 21 degrees in Paris.<turn|>"]
    untrained = tok.decode(
        [t for r in rows for t, label in zip(r.input_ids, r.labels) if label == IGNORE_INDEX]
    )
    assert '{"celsius": 21}' in untrained or "celsius" in untrained


# ---- 6. the token that ends a tool-call turn ------------------------------------------------------


@pytest.mark.parametrize("name", ["glm-4.6", "glm-4.7-flash"])
@pytest.mark.parametrize("last", [False, True], ids=["result-follows", "call-is-last"])
def test_glm_tool_call_turn_trains_observation(name, last):
    """GLM-4.x has no end-of-turn token: a call ends with <|observation|>, the token generation stops
    on. It is trained, also when the conversation ends with the call (the template writes it only
    once a result follows)."""
    tok = rt.tokenizer(name)
    messages = json.loads(json.dumps(rt.TOOL_CALL[:2] if last else rt.TOOL_CALL))
    spans = texts(tok, rows_of(tok, messages, tools=[rt.WEATHER_TOOL]))
    assert spans[0].endswith("</tool_call><|observation|>"), spans
    assert "celsius" not in "".join(spans)


# ---- found by the property test ------------------------------------------------------------------


def test_command_r7b_trains_end_of_turn_after_end_response():
    """The model must write <|END_OF_TURN_TOKEN|> (its stop token) after <|END_RESPONSE|>; the
    template always renders an open generation prompt after the last turn, which is not trained."""
    tok = rt.tokenizer("command-r7b-tool-use")
    messages = rt.TWO_TURNS
    rows = rows_of(tok, messages)
    assert texts(tok, rows) == [
        "<|START_RESPONSE|>The capital is Paris.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
        "<|START_RESPONSE|>Rome, of course.<|END_RESPONSE|><|END_OF_TURN_TOKEN|>",
    ]


def test_plain_text_between_the_answer_and_the_closing_token_is_trained():
    """Apriel 1.5 closes a turn with '\\n<|end|>\\n</s>', its role tags plain text: the model writes them."""
    tok = rt.tokenizer("apriel-1.5-15b-thinker")
    assert "<|end|>" not in tok.get_added_vocab()
    rows = rows_of(tok, rt.TWO_TURNS)
    assert texts(tok, rows) == ["The capital is Paris.\n<|end|>\n</s>", "Rome, of course.\n<|end|>\n</s>"]


def test_reasoning_template_prompts_a_turn_without_reasoning_with_thinking_off():
    """Nemotron 3 renders a finished turn '<think></think>answer'; its prompt with thinking off ends
    '<think></think>': that is the prompt, and the answer alone is trained."""
    tok = rt.tokenizer("nemotron-3-nano-30b-a3b")
    rows = rows_of(tok, rt.TWO_TURNS)
    assert texts(tok, rows) == ["The capital is Paris.<|im_end|>", "Rome, of course.<|im_end|>"]
    prompt = tok.apply_chat_template(
        rt.TWO_TURNS[:1], add_generation_prompt=True, enable_thinking=False, tokenize=False
    )
    start = oracle.trained_spans(rows[0].labels)[0][0]
    assert rows[0].input_ids[:start] == oracle.inference_ids(tok, prompt)


def test_an_answer_that_writes_the_end_of_turn_token_is_still_closed_by_the_template():
    """Shrunk by the property test: an answer whose text is '<|assistant_end|>' (Apertus' end of turn)
    is the answer; the template's own closing token follows it (a middle turn) or, where the template
    leaves the last turn open, EOS does."""
    tok = rt.tokenizer("apertus-8b-instruct")
    messages = [
        {"role": "user", "content": "Write the end token."},
        {"role": "assistant", "content": "<|assistant_end|>"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "<|assistant_end|>"},
    ]
    rows = rows_of(tok, messages)
    check(tok, messages, "apertus-8b-instruct", rows)
    assert texts(tok, rows) == ["<|assistant_end|><|assistant_end|>"] * 2  # the answer, then the closer / EOS


def test_an_answer_a_template_renders_as_nothing_is_refused_by_its_turn():
    """Shrunk by the property test: GLM reads reasoning out of the text (split on </think>), so the
    answer '</think>' renders as an empty turn: refused, naming the turn, never trained as something else."""
    from sftrainer.errors import TemplateError

    tok = rt.tokenizer("glm-4.6")
    messages = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "</think>"}]
    with pytest.raises(TemplateError, match=r"messages\[1\].*does not render this assistant turn"):
        rows_of(tok, messages)
