"""Property test: prepared rows are exactly what inference gives, for every template and tokenizer.

Conversations, prompts and answers are drawn from adversarial pieces: the template's own header and
special-token text written as plain text, runs of whitespace and newlines, CRLF, tabs, NBSP,
zero-width and combining characters, emoji with modifiers, CJK and right-to-left text, punctuation
and words cut at the prompt/answer boundary, Jinja-looking text, very long tokens, Unicode
noncharacters. Every prepared row must agree with ``inference_oracle`` (which shares no code with
the pipeline): the tokens before each trained span are the ids inference gives that prompt, the
trained text is each answer and its end-of-turn token, nothing else is trained.

Templates: every one in ``chat_templates/``, each with a byte-level tokenizer built for it
(``released_templates.tokenizer``) and with one of the released tokenizers in ``tokenizers/`` (in
turn; its control tokens added as special tokens, as ``clone_chat_template`` does); the released
tokenizers' own templates with the tokenizer as released. Raw prompt/completion pairs: every released
tokenizer and both built kinds.

CI runs a fixed-seed profile in about a minute (60 s on a 2-core VM); ``SFTRAINER_PROPERTY_PROFILE=thorough`` runs
every template with every released tokenizer and many more examples. Failures it shrinks to are
kept as regular tests in ``test_inference_cases.py``.
"""

from __future__ import annotations

import os

import inference_oracle as oracle
import pytest
import real_tokenizers
import released_templates as rt
import tokenizers_zoo as zoo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftrainer.data.formats import ChatExample, PairExample, normalise_messages
from sftrainer.data.tokenize import ExampleTokenizer
from sftrainer.errors import TemplateError

pytestmark = pytest.mark.slow

PROFILE = os.environ.get("SFTRAINER_PROPERTY_PROFILE", "ci")
THOROUGH = PROFILE == "thorough"
settings.register_profile(
    "ci",
    max_examples=5,
    derandomize=True,  # a fixed seed: the same examples on every run
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    database=None,
)
settings.register_profile(
    "thorough",
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
PAIR_EXAMPLES = 200 if THOROUGH else 40

ATOMS = [
    " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\r\n", "\t", " \n", "\u00a0", "\u200b", "\u200d", "\ufeff",
    "e\u0301", "\u0301", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\u65e5\u672c\u8a9e", "\u4e2d\u6587", "\u05e2\u05d1\u05e8\u05d9\u05ea", "\u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "{", "}", "[", "]", "(", ")", ":", ".", ",", "<", ">", '"', "'", "/", "|", "#", "*", "-",
    "ret", "urn", "olsun", "lar", "Question:", "Answer: 4", "{{ x }}", "{% if x %}", "{#",
    "x" * 120, "=" * 64, "\ufdd0", "\ufdd1", "\ufdef", "a", "b", "0", "42", "the", " the", "Hello", " world",
    "assistant", "user", "system", "\nassistant\n", "### Assistant:", "ASSISTANT:", "[INST]", "[/INST]",
]  # fmt: skip
WORD = st.text(alphabet="abcdefghij XYZ019", min_size=1, max_size=6)
ZERO_WIDTH = "\u200b\u200d\ufeff\u0301"
REASONING_TAGS = ("<think>", "</think>")


def texts(pieces: list[str]) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(st.sampled_from(pieces), WORD), min_size=1, max_size=7).map("".join)


def visible(text: str) -> bool:
    return any(not c.isspace() and c not in ZERO_WIDTH for c in text)


# ---- templates and tokenizers ---------------------------------------------------------------------


def eot_of(name: str, tok) -> str | None:
    """The end-of-turn text as this tokenizer renders it: the template's literal token, or the
    tokenizer's EOS where the template writes ``eos_token``."""
    info = rt.INDEX[name]
    eot = info["end_of_turn"]
    if eot and eot not in rt.template(name) and eot == info["eos_token"]:
        return tok.eos_token
    return eot


ALL_SPECIALS = tuple(dict.fromkeys(t for name in rt.NAMES for t in rt.specials(name)))


def stop_tokens(name: str) -> tuple[str, ...]:
    """Tokens besides the end-of-turn token that end a turn: the model's stop tokens, and its EOS
    where the template writes it as text (gpt-oss ends the last turn with <|return|>)."""
    info = rt.INDEX[name]
    eos = info["eos_token"] if info["eos_token"] in rt.template(name) else None
    return tuple(t for t in (*(info.get("stop_tokens") or ()), eos) if t)


def released_tokenizer_for(name: str, real: str):
    """A released tokenizer with every template's control tokens added (one build per tokenizer)."""
    return real_tokenizers.templated(real_tokenizers.with_tokens(real, ALL_SPECIALS), rt.template(name))


def cases() -> list[tuple[str, str]]:
    """(template, tokenizer) pairs: each template with its built tokenizer and a released one."""
    out = []
    for k, name in enumerate(rt.NAMES):
        out.append((name, "built"))
        reals = real_tokenizers.NAMES if THOROUGH else [real_tokenizers.NAMES[k % len(real_tokenizers.NAMES)]]
        out += [(name, real) for real in reals]
    out += [
        ("mistral-7b-instruct-v0.1", "mistral-7b-v0.1:native"),
        ("llama-2-chat", "mistral-7b-v0.1:native"),
    ]
    out += [("llama-3.1-instruct", "llama-3.1-instruct:native")]
    return out


def tokenizer_for(name: str, kind: str):
    if kind == "built":
        return rt.tokenizer(name)
    if kind.endswith(":native"):  # as released: the template's control text is what the vocabulary has
        return real_tokenizers.templated(
            real_tokenizers.with_tokens(kind.removesuffix(":native")), rt.template(name)
        )
    return released_tokenizer_for(name, kind)


def shapes(name: str, tok) -> dict[str, object]:
    """What the template renders: with a system message, whether it needs tools, the settings it
    needs (index.json's template_kwargs: a date, Firefunction's functions)."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    kwargs = dict(rt.INDEX[name].get("template_kwargs") or {})
    tools = None
    try:
        tok.apply_chat_template(probe, tokenize=False, **kwargs)
    except Exception:
        tools = [rt.WEATHER_TOOL]
        tok.apply_chat_template(probe, tools=tools, tokenize=False, **kwargs)
    try:
        tok.apply_chat_template(
            [{"role": "system", "content": "s"}, *probe], tools=tools, tokenize=False, **kwargs
        )
        system = True
    except Exception:
        system = False
    return {"tools": tools, "system": system, "kwargs": kwargs}


@st.composite
def conversations(draw, pieces: list[str], system: bool, trailing_space: bool):
    answer = texts(pieces).filter(visible)
    if not trailing_space:
        answer = answer.filter(lambda t: t == t.rstrip())
    messages = []
    if system and draw(st.booleans()):
        messages.append({"role": "system", "content": draw(texts(pieces).filter(visible))})
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(texts(pieces).filter(visible))})
        messages.append({"role": "assistant", "content": draw(answer)})
    return messages


CASES = cases()


@pytest.mark.parametrize(("name", "kind"), CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_chat_rows_are_what_inference_gives(name, kind):
    tok = tokenizer_for(name, kind)
    shape = shapes(name, tok)
    eot = eot_of(name, tok)
    stops = stop_tokens(name)
    pieces = [*ATOMS, *rt.specials(name), tok.eos_token, *([tok.bos_token] if tok.bos_token else [])]
    encoder = ExampleTokenizer(tok, template_kwargs=shape["kwargs"])  # one per data set, as prepare() has it

    @settings(settings.get_profile(PROFILE))
    @given(conversations(pieces, shape["system"], trailing_space=eot is not None))
    def check(messages):
        example = ChatExample(normalise_messages(messages, "messages"), tools=shape["tools"])
        try:
            rows = encoder.tokenize([example])
        except TemplateError as err:
            # A template that reads reasoning out of the text (split on </think>) can render an
            # answer as nothing: refused by name, never trained as something else.
            at = int(str(err).split("messages[")[1].split("]")[0])
            assert any(tag in messages[at]["content"] for tag in REASONING_TAGS), err
            return
        full, turns = oracle.expected_turns(
            tok, messages, eot, stops, tools=shape["tools"], **shape["kwargs"]
        )
        oracle.check_chat_rows(tok, rows, full, turns)

    check()


PAIR_TOKENIZERS = [*real_tokenizers.NAMES, "built:byte_level", "built:metaspace"]


def pair_tokenizer(kind: str):
    if kind == "built:byte_level":
        return zoo.build("byte_level", bos=None, eos="<|endoftext|>")
    if kind == "built:metaspace":
        return zoo.build("metaspace", bos="<s>", eos="</s>", add_bos=True)
    return real_tokenizers.load(kind)


@st.composite
def pairs(draw):
    """A prompt and a completion, often cut inside a word or a run of whitespace."""
    head = draw(texts(ATOMS))
    word = draw(st.sampled_from(["return", "olsun" + "lar", "\n\n\n", "   ", "hello", '{"a": 1}', "1234"]))
    cut = draw(st.integers(0, len(word)))
    tail = draw(texts(ATOMS))
    prompt, completion = head + word[:cut], word[cut:] + tail
    if not prompt or not completion.strip():
        completion = "x" + completion
    return prompt or "p", completion


@pytest.mark.parametrize("kind", PAIR_TOKENIZERS)
def test_raw_pairs_are_what_inference_gives(kind):
    tok = pair_tokenizer(kind)
    encoder = ExampleTokenizer(tok)

    @settings(settings.get_profile(PROFILE), max_examples=PAIR_EXAMPLES)
    @given(pairs())
    def check(pair):
        prompt, completion = pair
        rows = encoder.tokenize([PairExample(prompt, completion)])
        oracle.check_pair_row(tok, rows, prompt, completion)

    check()
