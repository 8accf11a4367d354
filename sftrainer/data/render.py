"""Rendering a conversation with its chat template, and what the template writes around a turn.

``ChatRenderer`` renders conversations exactly as ``apply_chat_template(tokenize=False)`` does (the direct
path is checked against it once per kind of rendering, ``_render``), and learns from renderings the markup a
template writes around an assistant turn: the header the generation prompt adds (``_assistant_header``), the
text that closes a turn (``_closing``), the generation prompts with thinking off and on, and the special
tokens that text is made of (a span never splits one: ``_outside_special`` / ``_past_special``). Each is
learned once per kind of rendering and cached on the instance.

Markers (``turn_marker``): text built from Unicode noncharacters the conversation does not hold, so a rendered
marker can never be mistaken for the conversation's text. ``sftrainer.data.turns`` locates turns with them.
Nothing here tokenizes a row; ids and labels are ``sftrainer.data.tokenize``'s.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from typing import Any, cast

from transformers.utils.chat_template_utils import render_jinja_template

from sftrainer.data.formats import ChatExample
from sftrainer.errors import RowError

_compiled_template: Callable[[str], Any] | None
try:  # the compiled, cached template render_jinja_template renders with (private: used where present)
    from transformers.utils.chat_template_utils import _compile_jinja_template as _compiled_template
except ImportError:  # pragma: no cover - another transformers
    _compiled_template = None

logger = logging.getLogger(__name__)


class ChatRenderer:
    """Renders conversations with one tokenizer's chat template and learns its turn markup. Picklable."""

    def __init__(self, tokenizer: Any, template_kwargs: dict[str, Any] | None = None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})
        self._headers: dict[tuple[Any, ...], str] = {}
        self._opens: dict[str, frozenset[str | None]] = {}
        self._warned_null_content = False
        # The template to use, keyed by "has no tools"; whether direct rendering matched, keyed by
        # "has no tools" and "plain text" (_plain_text).
        self._templates: dict[bool, str] = {}
        self._direct: dict[tuple[bool, bool], bool] = {}
        # The text that closes an assistant turn, per kind of rendering (_closing).
        self._closings: dict[tuple[bool, str], str] = {}

    @cached_property
    def _special_tokens(self) -> dict[str, str]:
        return dict(self.tokenizer.special_tokens_map)

    @cached_property
    def special_texts(self) -> list[str]:
        """The text of every special / added token, longest first (so "<|end|>" loses to "<|endoftext|>")."""
        ids = set(self.tokenizer.all_special_ids)
        ids.update(self.tokenizer.added_tokens_decoder)
        texts = {self.tokenizer.convert_ids_to_tokens(i) for i in ids}
        return sorted((t for t in texts if t), key=len, reverse=True)

    @cached_property
    def _special_pattern(self) -> re.Pattern[str] | None:
        """Matches the text of any special or added token (None if the tokenizer has none)."""
        return re.compile("|".join(map(re.escape, self.special_texts))) if self.special_texts else None

    def _render(self, example: ChatExample, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        kwargs = {**self.template_kwargs, **example.template_kwargs}
        plain = _plain_text(messages, kwargs)
        key = (example.tools is None, plain)
        if self._direct.get(key) is False:
            return self._apply_chat_template(messages, example.tools, generation_prompt, kwargs)
        if key in self._direct:
            return self._render_direct(messages, example.tools, generation_prompt, kwargs, plain)
        # First rendering of this kind: check the direct path against apply_chat_template once.
        reference = self._apply_chat_template(messages, example.tools, generation_prompt, kwargs)
        try:
            direct = self._render_direct(messages, example.tools, generation_prompt, kwargs, plain)
        except Exception:
            direct = None
        self._direct[key] = direct == reference
        if direct != reference:
            logger.debug("Rendering through apply_chat_template: the direct rendering differs")
        return reference

    def _apply_chat_template(
        self, messages: list[dict[str, Any]], tools: Any, generation_prompt: bool, kwargs: dict[str, Any]
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=generation_prompt, tokenize=False, **kwargs
        )

    def _render_direct(
        self,
        messages: list[dict[str, Any]],
        tools: Any,
        generation_prompt: bool,
        kwargs: dict[str, Any],
        plain: bool = False,
    ) -> str:
        """What ``apply_chat_template(tokenize=False)`` renders, without its per-call overhead (about
        half the time of a rendering): the template looked up once, null keys dropped as it drops them.
        Plain-text conversations (``plain``: ``_plain_text`` holds) go to transformers' compiled
        (sandboxed, cached) template itself, which skips the copies made to turn rich objects into
        plain data (a further quarter).
        Used only after one rendering of each kind matched ``apply_chat_template`` exactly."""
        key = tools is None
        if key not in self._templates:
            self._templates[key] = self.tokenizer.get_chat_template(None, tools)
        variables = {**self._special_tokens, **kwargs}
        if tools is None and _compiled_template is not None and plain:
            template = _compiled_template(self._templates[key])
            return template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=generation_prompt,
                **variables,
            )
        without_nulls = [{k: v for k, v in m.items() if v is not None} for m in messages]
        # Annotated as returning str; it returns (rendered conversations, generation indices).
        rendered, _ = cast(
            tuple[list[str], list[Any]],
            render_jinja_template(
                conversations=[without_nulls],
                tools=tools,
                chat_template=self._templates[key],
                add_generation_prompt=generation_prompt,
                **variables,
            ),
        )
        return rendered[0]

    def _render_without_null_content(self, example: ChatExample, err: Exception) -> tuple[ChatExample, str]:
        """Templates without tool support read every message's content, and transformers drops a
        null one (a turn that only calls tools): render those as empty text, so that the turn is
        then reported for what it is, a tool call the template cannot show.

        Some templates that do render tool calls also break on the dropped key (Qwen3). Empty text is
        what those templates mean by "no content", but a template that tests ``content is none``
        (DeepSeek-R1-Distill) renders an extra empty turn for it: said once per process, so the
        rendering can be checked rather than trusted silently."""
        if not any(m.get("content") is None for m in example.messages):
            raise RowError("messages", f"the chat template rejected this conversation: {err}") from None
        messages = [{**m, "content": m.get("content") or ""} for m in example.messages]
        example = dataclasses.replace(example, messages=messages)
        try:
            full = self._render(example, messages, False)
        except Exception as again:
            raise RowError("messages", f"the chat template rejected this conversation: {again}") from None
        if not self._warned_null_content:
            self._warned_null_content = True
            logger.warning(
                "The chat template fails on a message without `content` (transformers drops a null "
                "`content`, as in turns that only call tools); such messages are rendered with empty "
                "text instead. Check that tool-call turns render as the model expects (report.html "
                'shows the masking preview), or write `content: ""` into the data yourself.'
            )
        return example, full

    def _assistant_header(self, example: ChatExample, i: int) -> str:
        """The text the generation prompt adds before an answer (``<|im_start|>assistant\\n``).

        It is what the model is given at inference, so it is never trained. Where the finished
        conversation renders it differently (a reasoning template's generation prompt opens a think
        block), only the part found in the conversation is untrained; see ``_locate_turn``.
        """
        context = example.messages[:i] if i > 0 else [{"role": "user", "content": "x"}]
        # The generation prompt depends on the settings and on what precedes it (DeepSeek-R1 adds
        # none after a tool result), not on the text of the conversation: computed once per kind.
        variables = repr(sorted(example.template_kwargs.items())) if example.template_kwargs else ""
        key = (context[-1]["role"], example.tools is None, variables)
        if key not in self._headers:
            self._headers[key] = self._render_header(example, context)
        return self._headers[key]

    def _render_header(self, example: ChatExample, context: list[dict[str, Any]]) -> str:
        try:
            without = self._render(example, context, False)
            with_prompt = self._render(example, context, True)
        except Exception:  # e.g. a template that cannot render a conversation ending here
            return ""
        cut = common_prefix(without, with_prompt)
        # Where the two part inside the template's own text (Phi-3 ends a finished conversation
        # with "<|endoftext|>", a prompt with "<|assistant|>"), go back to a token boundary.
        return with_prompt[self._token_start_at_or_before(with_prompt, cut) :]

    def _token_start_at_or_before(self, text: str, cut: int) -> int:
        if cut >= len(text) or not getattr(self.tokenizer, "is_fast", False):
            return cut
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return max((s for s, _ in offsets["offset_mapping"] if s <= cut), default=0)

    def _same_with_a_user_after(self, example: ChatExample, full: str) -> int:
        """How far the conversation renders the same with a user message after it: all of it, or up
        to what a template renders after the last turn (a generation prompt, instructions), the
        token where the two part excluded (it opens what comes next)."""
        try:
            longer = self._render(
                example, [*example.messages, {"role": "user", "content": MARKER_CHARS[0]}], False
            )
        except Exception:
            return 0
        shared = self._outside_special(full, common_prefix(full, longer))
        if shared < len(full) and self._special_pattern is not None:
            last = [m for m in self._special_pattern.finditer(full, 0, shared) if m.end() == shared]
            if last:
                shared = last[-1].start()
        return shared

    def _thinking_prompts(self, example: ChatExample, i: int, prompt: str | None) -> list[str]:
        """The generation prompt with thinking off, then on (``enable_thinking``), where they differ
        from ``prompt``: a reasoning template prompts a turn that holds no reasoning with one of them
        (GLM ``<|assistant|></think>`` with thinking off; Command R7B ``<|CHATBOT_TOKEN|>`` with it
        on, after which the model writes ``<|START_RESPONSE|>``)."""
        out = []
        for value in (False, True):
            variant = dataclasses.replace(
                example, template_kwargs={**example.template_kwargs, "enable_thinking": value}
            )
            try:
                rendered = self._render(variant, example.messages[:i], True)
            except Exception:
                continue
            if rendered != prompt and rendered not in out:
                out.append(rendered)
        return out

    def _past_special(self, text: str, at: int) -> int:
        """``at``, or the end of the special token of ``text`` that it falls inside."""
        start = self._outside_special(text, at)
        if start == at:
            return at
        assert self._special_pattern is not None  # _outside_special moves ``at`` only on a match
        found = self._special_pattern.match(text, start)
        return found.end() if found is not None else at

    def _outside_special(self, text: str, at: int) -> int:
        """``at``, or the start of the special token of ``text`` that it falls inside."""
        if self._special_pattern is None:
            return at
        longest = len(self.special_texts[0])
        for found in self._special_pattern.finditer(text, max(0, at - longest), at + longest):
            if found.start() < at < found.end():
                return found.start()
        return at

    def _ends_with_closer(self, text: str, header: str, message: dict[str, Any]) -> bool:
        """Whether ``text`` ends with a special token the template wrote to end a turn: not BOS, not
        the token that opens a turn header, and not the end of the message's own text."""
        if self._special_pattern is None:
            return False
        token = next((t for t in self.special_texts if text.endswith(t)), None)
        content = message.get("content")
        return (
            token is not None
            and token not in self._opening_tokens(header)
            and not (isinstance(content, str) and content.rstrip().endswith(token))
        )

    def _close_turn(self, example: ChatExample, full: str, e: int, header: str) -> tuple[int, bool]:
        """The end of a turn whose text ends at ``e``, and whether a token closes it: through the text
        the template closes an assistant turn with where it follows (``_closing``: Command R7B's
        ``<|END_RESPONSE|><|END_OF_TURN_TOKEN|>``, Apriel's ``\n<|end|>\n</s>``); else through the
        special token that follows (after whitespace, or the closing quotes and brackets of tool-call
        JSON); else ``e`` itself. BOS and the token that opens a turn header (``<|im_start|>`` in a
        template with no end-of-turn token) begin the next turn: they do not close this one."""
        closing = self._closing(example)
        if closing and full.startswith(closing, e):
            return e + len(closing), True
        k = e
        while k < len(full) and full[k] in " \t\n\"'}])`":
            k += 1
        found = self._special_pattern.match(full, k) if self._special_pattern is not None else None
        if found is None:
            return e, False
        opens = self._opening_tokens(header)
        if found.group() not in opens:  # the longest special token there, as in the loop below
            return found.end(), True
        for token in self.special_texts:
            if token not in opens and full.startswith(token, k):
                return k + len(token), True
        return e, False

    def _closing(self, example: ChatExample) -> str:
        """The text this template writes after an assistant turn's text to close it, through its
        last closing special token: what a turn followed by another message and a conversation's last
        turn share after the answer (learned once per kind of rendering; "" where they share no
        closing token: GLM, whose next turn's role token closes a turn)."""
        key = (example.tools is None, repr(sorted(example.template_kwargs.items())))
        if key not in self._closings:
            self._closings[key] = self._learn_closing(example)
        return self._closings[key]

    def _learn_closing(self, example: ChatExample) -> str:
        mark = f"{MARKER_CHARS[0]}sftrainer-closing{MARKER_CHARS[1]}"
        ask, answer = {"role": "user", "content": "x"}, {"role": "assistant", "content": mark}
        probe = dataclasses.replace(example, messages=[ask, answer], first_trainable=0)
        try:
            last = self._render(probe, [ask, answer], False)
            followed = self._render(probe, [ask, answer, {"role": "user", "content": "y"}], False)
        except Exception:
            return ""
        if last.count(mark) != 1 or followed.count(mark) != 1:
            return ""
        after_last, after_followed = last.split(mark)[1], followed.split(mark)[1]
        shared = after_last[: self._outside_special(after_last, common_prefix(after_last, after_followed))]
        ends = [m.end() for m in self._special_pattern.finditer(shared)] if self._special_pattern else []
        if ends and ends[-1] == len(shared) < len(after_last):
            # Both go on past a special token, differently: it opens what comes next (Command R7B
            # always renders a generation prompt, <|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>).
            ends.pop()
        opens = self._opening_tokens(self._assistant_header(probe, 1))
        closes = tuple(t for t in self.special_texts if t not in opens)
        ends = [end for end in ends if shared[:end].endswith(closes)]
        return shared[: ends[-1]] if ends else ""

    def _opening_tokens(self, header: str) -> frozenset[str | None]:
        """BOS and the special token a turn header starts with: they open a turn, not close one."""
        if header not in self._opens:
            opens = {
                self.tokenizer.bos_token,
                next((t for t in self.special_texts if header.startswith(t)), None),
            }
            opens.discard(self.tokenizer.eos_token)  # Falcon, Granite: BOS and EOS are one token
            self._opens[header] = frozenset(opens)
        return self._opens[header]


def _plain_text(messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> bool:
    """Messages of only a role and a text, and template variables of plain values: what a template
    is given as they are (nothing to convert or drop, no reasoning to alias)."""
    return all(
        len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str for m in messages
    ) and all(v is None or type(v) in (str, int, float, bool) for v in kwargs.values())


# Unicode noncharacters (U+FDD0-U+FDEF): a turn marker opens and closes with two that the conversation
# does not hold, so where the marker starts and ends can never be mistaken for text of the turn.
MARKER_CHARS = tuple(chr(c) for c in range(0xFDD0, 0xFDF0))


def turn_marker(example: ChatExample) -> str:
    """A marker built from noncharacters that occur nowhere in the conversation (its messages, tools
    and template settings), so a turn's text can neither start nor end like it."""
    text = "".join(_strings([example.messages, example.tools, example.template_kwargs]))
    free = [c for c in MARKER_CHARS if c not in text]
    if len(free) < 2:
        raise RowError("messages", "the conversation holds every Unicode noncharacter U+FDD0-U+FDEF")
    return f"{free[0]}sftrainer-turn{free[1]}"


def _strings(value: Any) -> Iterator[str]:
    """Every string in nested lists and dicts (keys too)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def marked_conversations(messages: list[dict[str, Any]], i: int, marker: str) -> list[list[dict[str, Any]]]:
    """The conversation with assistant turn ``i`` replaced by ``marker``, in the forms to try.

    First a plain turn holding the marker (as one text part when the turn's content is a list of
    parts): reasoning, text and tool calls all differ from it. For
    templates that refuse a tool result with no call before it, a turn that keeps its calls with
    marked arguments.
    """
    plain = {"role": "assistant", "content": marker_content(messages[i], marker)}
    out = [[*messages[:i], plain, *messages[i + 1 :]]]
    calls = messages[i].get("tool_calls")
    if calls:
        marked_calls = [
            {**call, "function": {**call["function"], "arguments": {"marker": marker}}}
            if "function" in call
            else {**call, "arguments": {"marker": marker}}
            for call in calls
        ]
        out.append([*messages[:i], {"role": "assistant", "tool_calls": marked_calls}, *messages[i + 1 :]])
    return out


def marker_content(message: dict[str, Any], marker: str) -> str | list[dict[str, str]]:
    """A marker as the content of ``message``: one text part where its content is a list of typed
    parts (vision-language templates iterate over parts), the plain string otherwise."""
    return [{"type": "text", "text": marker}] if isinstance(message.get("content"), list) else marker


def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search: string comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def common_suffix(a: str, b: str, limit: int) -> int:
    return common_prefix(a[::-1][:limit], b[::-1][:limit])
