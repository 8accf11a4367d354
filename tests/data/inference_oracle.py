"""What a prepared row must hold, worked out from the chat template and the tokenizer alone.

This module shares no code with ``sftrainer.data``: it renders each prefix of a conversation with the
generation prompt and tokenizes it, as inference does, and states what every trained span must be.

For assistant turn ``i`` of a conversation whose full rendering is ``F``:

- its prompt ``G`` is the conversation before it rendered with the generation prompt. Where ``F``
  starts with ``G`` (most templates), the row's tokens before the turn's trained span are the ids
  inference gives ``G``: ``tokenizer(G, add_special_tokens=False)``, BOS first where the tokenizer
  adds one. Where it does not because the generation prompt opens a think block and the turn holds
  no reasoning, ``G`` is the generation prompt with thinking off (``enable_thinking=False``: GLM's
  ``<|assistant|></think>``). Otherwise (a history the template rewrites) the span starts after the
  last special token the two share. A reasoning block the template writes empty between ``G`` and
  a turn that holds no reasoning (Qwen3's ``<think>\n\n</think>\n\n``) is prompt, not answer: the
  trained text starts at the turn's own text;
- its trained text runs from there through the turn's end-of-turn token: the rendering of the
  conversation that ends with this turn, up to where it parts from ``F``, cut after the template's
  end-of-turn token. A template without one gets the token the next turn opens with when it is one
  of the model's stop tokens (GLM's ``<|user|>``), else EOS;
- nothing else is trained, and each turn is trained once (in one of the rows the conversation gives).

The trained text is compared as the tokenizer decodes it, after the prompt: the row's tokens up to
the span's end decode to what the prompt and the trained text, tokenized whole, decode to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100
NEXT = {"role": "user", "content": "\u2603"}  # a message after the last, to see where the last turn ends


@dataclass(frozen=True)
class Turn:
    index: int  # position of the assistant message
    starts: tuple[int, ...]  # where its trained text may start in the full rendering (one where exact)
    end: int  # where its trained text ends in the full rendering
    suffix: str  # what training appends after it (EOS, or a closing token the rendering lacks)
    exact: bool  # the prompt before it is a generation prompt inference renders
    checked: bool  # the oracle can state the text (the template does not rewrite this turn later)


def render(tok: Any, messages: list[dict], generation_prompt: bool = False, **kwargs: Any) -> str:
    """The template's rendering. A message without content (a turn that only calls tools) is
    rendered with empty text where the template cannot do without (it reads ``message.content``)."""
    try:
        return tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )
    except Exception:
        if not any(m.get("content") is None for m in messages):
            raise
        filled = [{**m, "content": m.get("content") or ""} for m in messages]
        return tok.apply_chat_template(
            filled, tokenize=False, add_generation_prompt=generation_prompt, **kwargs
        )


def adds_bos(tok: Any) -> bool:
    bos = tok.bos_token_id
    with_specials = tok("a")["input_ids"]
    return (
        bos is not None
        and with_specials[:1] == [bos]
        and tok("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    )


def inference_ids(tok: Any, text: str) -> list[int]:
    """The ids a model is given for ``text`` (a rendered prompt, or raw text)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if adds_bos(tok) and ids[:1] != [tok.bos_token_id]:
        ids = [tok.bos_token_id, *ids]
    return ids


def decoded(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _special_ends(tok: Any, text: str) -> list[int]:
    """Positions in ``text`` right after an added token."""
    tokens = [t for t in tok.get_added_vocab() if t]
    out = []
    for token in tokens:
        at = text.find(token)
        while at >= 0:
            out.append(at + len(token))
            at = text.find(token, at + 1)
    return sorted(out)


def _outside_tokens(tok: Any, text: str, at: int) -> int:
    """``at``, moved back to the start of an added token of ``text`` that it falls inside."""
    for token in tok.get_added_vocab():
        start = text.find(token, max(0, at - len(token) + 1))
        while 0 <= start < at:
            if start + len(token) > at:
                return start
            start = text.find(token, start + 1)
    return at


def expected_turns(
    tok: Any,
    messages: list[dict],
    end_of_turn: str | None,
    stop_tokens: tuple[str, ...] = (),
    train_last_only: bool = False,
    **kwargs: Any,
) -> tuple[str, list[Turn]]:
    """The full rendering, and each trained assistant turn as the oracle states it."""
    full = render(tok, messages, **kwargs)
    turns = []
    indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_last_only:
        indices = indices[-1:]
    closers = [t for t in (end_of_turn, *stop_tokens, tok.eos_token) if t]
    for i in indices:
        starts, exact = _starts(tok, messages, i, full, kwargs)
        start = starts[0]
        last = i == len(messages) - 1
        calls = bool(messages[i].get("tool_calls"))
        result_follows = not last and messages[i + 1]["role"] == "tool"
        # What comes after the turn: the next message, or where one would start after the last turn
        # (a tool's result after a call: the token that ends a call is written once a result follows).
        result = {"role": "tool", "content": "\u2603", "tool_call_id": _call_id(messages[i])}
        beyond = _render_or(tok, [*messages, NEXT], full, **kwargs) if last else full
        beyond_call = _render_or(tok, [*messages, result], full, **kwargs) if last and calls else full
        if result_follows:  # the turn ends where its result's text starts, at the last closer before it
            changed = [*messages[: i + 1], {**messages[i + 1], "content": "\u2603"}, *messages[i + 2 :]]
            bound = _outside_tokens(tok, full, _common_prefix(full, render(tok, changed, **kwargs)))
            opener = _header_opener(tok, messages, i, kwargs)  # no closer: before the next turn's header
            if opener and opener in full[start:bound] and not any(t in full[start:bound] for t in closers):
                bound = full.index(opener, start)
        else:
            ending = full if last else render(tok, messages[: i + 1], **kwargs)
            bound = _outside_tokens(tok, full, _common_prefix(ending, beyond))
            if last and calls:  # a call may render otherwise with a user after it than with a result
                bound = max(bound, _outside_tokens(tok, full, _common_prefix(full, beyond_call)))
                if bound < len(full) and bound not in _special_ends(tok, full):
                    bound = len(full)  # they part inside the call's own text: it renders otherwise
                opener = _header_opener(tok, messages, i, kwargs)  # no closer: before the next header
                if (
                    opener
                    and opener in full[start:bound]
                    and not any(t in full[start:bound] for t in closers)
                ):
                    bound = full.index(opener, start)
        checked = bound > starts[-1]  # else the template renders this turn otherwise once later turns follow
        window = full[start:bound]
        suffix = ""
        found = [window.rindex(t) + len(t) for t in closers if t in window]
        if (result_follows or (last and calls)) and found:
            end = start + max(found)
        elif end_of_turn and end_of_turn in window and not _left_open(tok, messages[: i + 1], kwargs):
            end = start + window.rindex(end_of_turn) + len(end_of_turn)
        else:  # the turn's text, then the token that closes it in the conversation, else EOS
            content = messages[i].get("content")
            kept = calls or (
                isinstance(content, str) and content != content.rstrip() and window.endswith(content)
            )
            end = start + len(window if kept else window.rstrip())
            rest = beyond_call[end:]
            stop = next((t for t in closers if rest.lstrip().startswith(t)), None)
            if stop is not None:
                span = len(rest) - len(rest.lstrip()) + len(stop)
                if end + span <= len(full):
                    end += span
                else:  # the closer is not in the rendering: training writes it after the turn
                    suffix = rest[:span]
            elif not any(full[:end].endswith(t) and not str(content).rstrip().endswith(t) for t in closers):
                suffix = (
                    tok.eos_token
                )  # nothing the template wrote closes the turn (the answer's own text does not)
        turns.append(Turn(i, starts, end, suffix, exact, checked))
    return full, turns


def _left_open(tok: Any, messages: list[dict], kwargs: dict) -> bool:
    """Whether the template writes nothing after the last message's text (Apertus, Hy3 leave a last
    turn open): then an end-of-turn token at its end is the message's own."""
    if not isinstance(messages[-1].get("content"), str):
        return False
    text = render(tok, [*messages[:-1], {**messages[-1], "content": "\u2603"}], **kwargs)
    return "\u2603" in text and not text[text.rindex("\u2603") + 1 :].strip()


def _render_or(tok: Any, messages: list[dict], default: str, **kwargs: Any) -> str:
    """The rendering, or ``default`` where the template refuses the conversation."""
    try:
        return render(tok, messages, **kwargs)
    except Exception:
        return default


def _call_id(message: dict) -> str:
    calls = message.get("tool_calls") or [{}]
    return str(calls[-1].get("id", "call12345"))


def _changed(message: dict) -> dict:
    """The message with the start of its own text changed: its content, or its first call's name."""
    if message.get("tool_calls"):
        call = message["tool_calls"][0]
        function = call.get("function", call)
        changed = {**function, "name": "\u2603" + function["name"]}
        first = {**call, "function": changed} if "function" in call else changed
        return {**message, "tool_calls": [first, *message["tool_calls"][1:]]}
    return {**message, "content": "\u2603" + str(message.get("content"))}


def _header_opener(tok: Any, messages: list[dict], i: int, kwargs: dict) -> str | None:
    """The added token a turn header opens with (ChatML <|im_start|>): the first one the generation
    prompt adds, where it adds any."""
    before = render(tok, messages[:i], **kwargs)
    header = render(tok, messages[:i], True, **kwargs)[len(before) :]
    found = [t for t in tok.get_added_vocab() if t and t in header]
    return min(found, key=header.index) if found else None


def _starts(tok: Any, messages: list[dict], i: int, full: str, kwargs: dict) -> tuple[tuple[int, ...], bool]:
    """Where turn ``i``'s trained text starts: after its generation prompt where the conversation
    starts with it (as rendered, with thinking off, or with thinking on); else anywhere from where the
    prompt and the conversation part to where the turn's own text starts (the oracle does not say
    which part of a rewritten header is prompt: only that the row's prompt is inference's for it)."""
    if i == 0:
        return (0,), True
    empty = _after_empty_reasoning(tok, messages, i, full, kwargs)
    if empty is not None:
        return (empty,), True
    for variant in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        prompt = render(tok, messages[:i], True, **{**kwargs, **variant})
        if full.startswith(prompt):
            return (len(prompt),), True
    prompt = render(tok, messages[:i], True, **kwargs)
    other = [
        *messages[:i],
        _changed(messages[i]),
        *messages[i + 1 :],
    ]
    own = _common_prefix(full, render(tok, other, **kwargs))  # where the turn's own text starts
    shared = min(_outside_tokens(tok, full, _common_prefix(prompt, full)), own)
    # back to the line or special token the parting point lies in ('Assistant\n<' + 'think>' / 'TOOLCALL>')
    shared = max([full.rfind("\n", 0, shared) + 1, *[e for e in _special_ends(tok, full) if e <= shared]])
    return tuple(range(shared, own + 1)), False


def _after_empty_reasoning(tok: Any, messages: list[dict], i: int, full: str, kwargs: dict) -> int | None:
    """Where turn ``i``'s own text starts, when the template writes an empty reasoning block between
    the generation prompt and it (the turn has no reasoning; given reasoning, the template writes it
    inside that block and nothing else changes): the block is context, not trained. None otherwise."""
    message = messages[i]
    if message.get("reasoning_content"):
        return None
    prompt = render(tok, messages[:i], True, **kwargs)
    if not full.startswith(prompt):
        return None
    thought = render(
        tok, [*messages[:i], {**message, "reasoning_content": "\u2604"}, *messages[i + 1 :]], **kwargs
    )
    at = thought.find("\u2604")
    if at < len(prompt) or thought[:at] + thought[at + 1 :] != full:
        return None  # the template writes no reasoning block there
    # the turn's own text: where the conversation changes when the turn's text starts otherwise
    content = message.get("content") or ""
    opened = render(
        tok, [*messages[:i], {**message, "content": "\u2603" + content}, *messages[i + 1 :]], **kwargs
    )
    own = _common_prefix(full, opened)
    return own if len(prompt) < own and at <= own else None


def trained_spans(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run of trained positions."""
    spans, start = [], None
    for k, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = k
        elif label == IGNORE and start is not None:
            spans.append((start, k))
            start = None
    return spans


def check_chat_rows(tok: Any, rows: list[Any], full: str, turns: list[Turn]) -> None:
    """Assert that ``rows`` (what preparing the conversation gave) hold to the oracle."""
    found = []
    for row in rows:
        ids, labels = list(row.input_ids), list(row.labels)
        assert all(label in (IGNORE, t) for t, label in zip(ids, labels)), "a label is not its token"
        found += [(ids, start, end) for start, end in trained_spans(labels)]
    assert len(found) == len(turns), (
        f"{len(found)} trained spans for {len(turns)} assistant turns: "
        f"{[decoded(tok, ids[s:e]) for ids, s, e in found]}"
    )
    for (ids, s, e), turn in zip(found, turns):
        starts = [k for k in turn.starts if ids[:s] == inference_ids(tok, full[:k])]
        prompt = inference_ids(tok, full[: turn.starts[0]])
        assert starts, (
            f"turn {turn.index}: prompt tokens differ from inference\n"
            f"  row:       {tok.convert_ids_to_tokens(ids[:s])[-8:]}\n"
            f"  inference: {tok.convert_ids_to_tokens(prompt)[-8:]}"
        )
        if turn.checked:
            want = decoded(tok, inference_ids(tok, full[: turn.end] + turn.suffix))
            got = decoded(tok, ids[:e])
            assert got == want, (
                f"turn {turn.index}: trained text differs\n  want {full[starts[0] : turn.end] + turn.suffix!r}\n"
                f"  got  {decoded(tok, ids[s:e])!r} {tok.convert_ids_to_tokens(ids[s:e])}"
            )


def check_pair_row(tok: Any, rows: list[Any], prompt: str, completion: str) -> None:
    """A raw prompt/completion pair: one row, the prompt's inference ids, then the completion and EOS."""
    assert len(rows) == 1
    ids, labels = list(rows[0].input_ids), list(rows[0].labels)
    spans = trained_spans(labels)
    assert len(spans) == 1, f"{len(spans)} trained spans for one completion"
    s, e = spans[0]
    assert e == len(ids) and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id, "no trained EOS"
    assert ids[:s] == inference_ids(tok, prompt), (
        "prompt tokens differ from inference: "
        f"{tok.convert_ids_to_tokens(ids[:s])[-6:]} vs {tok.convert_ids_to_tokens(inference_ids(tok, prompt))[-6:]}"
    )
    assert decoded(tok, ids[:-1]) == decoded(tok, inference_ids(tok, prompt + completion)), (
        f"trained text differs: {tok.convert_ids_to_tokens(ids[s:])}"
    )
