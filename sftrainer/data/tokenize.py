"""Examples -> ``input_ids`` + ``labels`` with the loss exactly on the trained tokens.

An example is first rendered into *segments*: consecutive pieces of text, each trained or not.
Chat templates are handled without ``{% generation %}`` markers: the text is the template's rendering
of the whole conversation, and each assistant turn is located in it by rendering the conversation
again with that turn replaced by a marker (see ``_locate_turn``), so any template works, including
ones that rewrite history or whose generation prompt differs from the finished conversation. Where
the rendering visibly writes every trained turn as given, behind its header, the turns are read from
it directly and the second rendering is skipped (``_verbatim_spans``).

The segments are then tokenized by ``encode.SegmentEncoder``: the ids before every trained span are
the ids inference gives that prompt, and each trained span decodes to exactly its text. A turn ends
with the token the template closes it with (``_close_turn``: the end-of-turn token, or the token
generation stops on, such as GLM's ``<|observation|>`` after a tool call); a turn the template does not
close gets EOS. Text that a template writes inside the assistant's turn but that the model does not
generate (tool results, in Gemma 4) is split out of the trained span (``_cut_at_tool_results``).

Output rows (``ExampleTokenizer.tokenize``): ``input_ids`` list[int], ``labels`` list[int] with
``IGNORE_INDEX`` on every untrained token. ``labels`` are aligned with ``input_ids`` (not shifted).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

try:  # the compiled, cached template render_jinja_template renders with (private: used where present)
    from transformers.utils.chat_template_utils import _compile_jinja_template as _compiled_template
except ImportError:  # pragma: no cover - another transformers
    _compiled_template = None

from sftrainer.constants import IGNORE_INDEX, LOSS_MASK_COLUMNS
from sftrainer.data.encode import Segment, SegmentEncoder, Tokenized
from sftrainer.data.formats import ChatExample, Example, PairExample, TextExample
from sftrainer.errors import RowError, TemplateError

logger = logging.getLogger(__name__)


class ExampleTokenizer:
    """Tokenizes examples for one tokenizer and one set of settings. Picklable for ``num_proc``."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
        split_rows: bool = True,
        train_empty_reasoning: bool = False,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on = train_on
        self.template_kwargs = dict(template_kwargs or {})
        self.train_empty_reasoning = train_empty_reasoning
        # Assistant turns whose empty reasoning block, written by the template, was left untrained
        # (_past_empty_reasoning): a running count the data pipeline reads per row.
        self.untrained_empty_reasoning = 0
        self._headers: dict[tuple[Any, ...], str] = {}
        self._opens: dict[str, frozenset[str | None]] = {}
        self._warned_null_content = False
        # The template to use, keyed by "has no tools"; whether direct rendering matched, keyed by
        # "has no tools" and "plain text" (_plain_text).
        self._templates: dict[bool, str] = {}
        self._direct: dict[tuple[bool, bool], bool] = {}
        # Whether turns found by _verbatim_spans matched the marked rendering (checked once).
        self._verbatim: bool | None = None
        # The text that closes an assistant turn, per kind of rendering (_closing).
        self._closings: dict[tuple[bool, str], str] = {}
        self.encoder = SegmentEncoder(tokenizer, max_length, split_rows)

    @cached_property
    def _special_tokens(self) -> dict[str, str]:
        return dict(self.tokenizer.special_tokens_map)

    @property
    def bos_id(self) -> int | None:
        """The BOS id if this tokenizer adds one to plain text (Llama, Gemma), else None (Qwen, GPT-2)."""
        return self.encoder.bos_id

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

    # ---- segments ---------------------------------------------------------------------------

    def segments(self, example: Example) -> list[Segment]:
        """Render an example into text segments, each marked trained or not."""
        return self.render(example)[0]

    def render(self, example: Example) -> tuple[list[Segment], int]:
        """Segments, and how many trained assistant turns the finished conversation renders
        differently from what the turn holds (history rewritten by the template: reasoning dropped
        from past turns, say). Those are trained as the finished conversation shows them."""
        if isinstance(example, TextExample):
            return [Segment(example.text, True)], 0
        if isinstance(example, PairExample):
            return [Segment(example.prompt, self.train_on == "all"), Segment(example.completion, True)], 0
        return self._chat_segments(example)

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
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        rendered, _ = render_jinja_template(
            conversations=[plain],
            tools=tools,
            chat_template=self._templates[key],
            add_generation_prompt=generation_prompt,
            **variables,
        )
        return rendered[0]

    def _chat_segments(self, example: ChatExample) -> tuple[list[Segment], int]:
        try:
            full = self._render(example, example.messages, False)
        except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
            example, full = self._render_without_null_content(example, err)
        messages = example.messages
        if self.train_on == "all":  # trailing whitespace untrained, as after every turn below
            end = len(full.rstrip())
            last = next((t for t in self.special_texts if full.endswith(t, 0, end)), None)
            closed = last is not None and last != self.tokenizer.bos_token  # ends with its closing token
            return [s for s in (Segment(full[:end], True, closed), Segment(full[end:], False)) if s.text], 0
        turns = [
            i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.first_trainable
        ]
        if self.train_on == "last_turn":
            turns = turns[-1:]
        if not turns:
            return [(full, False)], 0
        spans = self._verbatim_spans(example, full, turns) or self._diff_turns_at_once(example, full, turns)
        counted = self.untrained_empty_reasoning
        if spans is not None:
            try:
                return self._turn_segments(example, full, turns, spans)
            except (RowError, TemplateError):
                # decided turn by turn below, as the message then names the turn at fault
                self.untrained_empty_reasoning = counted  # each turn counted once
        return self._turn_segments(example, full, turns, None)

    def _turn_segments(
        self, example: ChatExample, full: str, turns: list[int], spans: list[tuple[int, int]] | None
    ) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        pos = rewritten = 0
        for k, i in enumerate(turns):
            c, e = spans[k] if spans is not None else self._diff_turn(example, full, i)
            header = self._assistant_header(example, i)
            start, end, closed = self._locate_turn(example, full, i, header, pos, c, e)
            text = full[start:end]
            if _calls_tools(example.messages, i):
                end, closed = self._end_of_call(example, full, i, header, start, end, closed)
                text = full[start:end]
                if k == len(turns) - 1 and i == len(example.messages) - 1:
                    text, last_closed = self._close_last_call(example, full, i, header, start, end)
                    closed = last_closed or (closed and text == full[start:end])
            segments += [Segment(full[pos:start], False), Segment(text, True, closed)]
            rewritten += not _renders_whole_turn(example.messages[i], text)
            pos = end
        segments.append(Segment(full[pos:], False))
        return [s for s in segments if s.text], rewritten

    def _end_of_call(
        self, example: ChatExample, full: str, i: int, header: str, start: int, end: int, closed: bool
    ) -> tuple[int, bool]:
        """The end of a turn that calls tools, read from the conversation rendered to end at this
        turn (what the model writes before any result comes), as (end, closed). Located by comparing
        renderings alone, a call turn can run into what its results render (templates number the
        results after the calls) or stop short of its own closing markup:

        - the located span runs past that rendering (Gemma 4 writes the results inside the model's
          turn: ``<|tool_call>...<tool_call|><|tool_response>result``): it ends there, closed by the
          token that follows (GLM's ``<|observation|>``) or else by the token the rendering ends with
          (``<|tool_response>``);
        - the rendering goes on past the span (MiniMax's ``</invoke></minimax:tool_call>[e~[``): the
          span runs through its last closing special token;
        - the two part at a special token (Command R7B renders a generation prompt after a last
          turn, a tool turn otherwise): the span runs through the last closing token they share."""
        try:
            if i == len(example.messages) - 1:
                # The last turn: a result after it shows where the turn ends (templates render a
                # generation prompt, or instructions, after the last turn).
                result = {
                    "role": "tool",
                    "content": MARKER_CHARS[0],
                    "tool_call_id": _call_id(example.messages[i]),
                }
                upto = self._render(example, [*example.messages, result], False)
            else:
                upto = self._render(example, example.messages[: i + 1], False)
        except Exception:
            return end, closed
        shared = self._outside_special(upto, _common_prefix(upto, full))
        if shared <= start:
            return end, closed
        if shared == len(upto) and start < shared <= end:
            if shared == end:  # the located span is the whole turn: closed by its last token?
                return end, closed or self._ends_with_closer(upto, header, example.messages[i])
            stop, after = self._close_turn(example, full, shared, header)
            if not after and self._ends_with_closer(upto, header, example.messages[i]):
                return shared, True
            return stop, after
        ends = (
            [m.end() for m in self._special_pattern.finditer(full, start, shared)]
            if self._special_pattern
            else []
        )
        if shared < len(upto):
            if shared == len(full) or not ends or ends[-1] != shared:
                return end, closed  # the conversation ends first (a last turn), or they part inside text
            ends.pop()  # both go on, differently, after this token: it opens what comes next
        opens = self._opening_tokens(header)
        closes = tuple(t for t in self.special_texts if t not in opens)
        ends = [k for k in ends if full[:k].endswith(closes)]
        return (ends[-1], True) if ends else (end, closed)

    def _close_last_call(
        self, example: ChatExample, full: str, i: int, header: str, start: int, end: int
    ) -> tuple[str, bool]:
        """The trained text of a conversation's last turn when it calls tools and nothing after the
        located span closes it:

        - the call's own closing markup goes on past the span (Kimi K3's ``<|close|>message<|sep|>
          <|end_of_msg|>``): through its last closing token, as far as the conversation renders the
          same with a user message after it (not into instructions a template renders after the
          last turn);
        - the span ends with EOS or the template's closing text, maybe then whitespace (Hy3);
        - the token that ends a call is the one the template writes once a result follows (GLM-4.x:
          ``<|observation|>``, the token generation stops on), found by rendering a result after it;
        - else the token the rendering ends the turn with (Gemma 4 writes ``<|tool_response>`` after
          a call no result follows)."""
        closes = tuple(t for t in self.special_texts if t not in self._opening_tokens(header))
        bound = self._same_with_a_user_after(example, full)
        ends = (
            [m.end() for m in self._special_pattern.finditer(full, end, bound)]
            if self._special_pattern
            else []
        )
        ends = [k for k in ends if full[:k].endswith(closes)]
        if ends:
            return full[start : ends[-1]], True
        trimmed = len(full[:end].rstrip())
        for token in (self.tokenizer.eos_token, self._closing(example)):
            if token and trimmed > start and full[:trimmed].endswith(token):
                return full[start:trimmed], True
        result = {"role": "tool", "content": "x", "tool_call_id": _call_id(example.messages[i])}
        try:
            after = self._render(example, [*example.messages, result], False)
        except Exception:
            after = ""
        if after.startswith(full[:end]):
            stop, closed = self._close_turn(example, after, end, header)
            if closed and stop > len(full):
                return after[start:stop], True
        return full[start:end], self._ends_with_closer(full[:end], header, example.messages[i])

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
        shared = self._outside_special(full, _common_prefix(full, longer))
        if shared < len(full) and self._special_pattern is not None:
            last = [m for m in self._special_pattern.finditer(full, 0, shared) if m.end() == shared]
            if last:
                shared = last[-1].start()
        return shared

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
        cut = _common_prefix(without, with_prompt)
        # Where the two part inside the template's own text (Phi-3 ends a finished conversation
        # with "<|endoftext|>", a prompt with "<|assistant|>"), go back to a token boundary.
        return with_prompt[self._token_start_at_or_before(with_prompt, cut) :]

    def _token_start_at_or_before(self, text: str, cut: int) -> int:
        if cut >= len(text) or not getattr(self.tokenizer, "is_fast", False):
            return cut
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return max((s for s, _ in offsets["offset_mapping"] if s <= cut), default=0)

    def _diff_turn(self, example: ChatExample, full: str, i: int) -> tuple[int, int]:
        """Where the template's text for assistant turn ``i`` lies in the full rendering (c, e).

        The conversation is rendered again with this turn replaced by a marker; the renderings
        agree before and after the turn, and differ exactly where the template put its text
        (reasoning, content and tool calls). This finds every turn a finished conversation holds,
        whatever the template does to history or after the last turn.
        """
        where = f"messages[{i}]"
        probe = None
        for marked in _marked_conversations(example.messages, i, _marker(example)):
            try:
                probe = self._render(example, marked, False)
                break
            except Exception as err:  # e.g. a tool result must follow a tool call: try the next
                error = err
        if probe is None:
            raise RowError(where, f"the chat template cannot render this conversation: {error}") from None
        c = _common_prefix(full, probe)
        e = len(full) - _common_suffix(full, probe, limit=min(len(full), len(probe)) - c)
        # Renderings that part or meet inside a special token (<|eom_id|> vs <|eot_id|> after the
        # marker) part at its start and meet at its end: a token is never split.
        return self._outside_special(full, c), self._past_special(full, e)

    def _verbatim_spans(
        self, example: ChatExample, full: str, turns: list[int]
    ) -> list[tuple[int, int]] | None:
        """``_diff_turn`` for every turn without another rendering, where the rendering shows it.

        Every message is plain text (no tools, tool calls, reasoning or parts) and none writes the
        text of a special token, so every special token in the rendering is the template's own. Then
        where a turn's header (which holds a special token) followed by the turn's exact text occurs
        once in the rendering, that is the template writing the turn: the turn's text lies there.
        A template that changes a turn's text (trims it, moves reasoning out of it) fails the search
        and the turn is found by the marked rendering. The first conversation read this way is also
        located the general way; a template whose results differ is never read this way again.
        """
        special = self._special_pattern
        if self._verbatim is False or example.tools is not None or special is None:
            return None
        for message in example.messages:
            content = message.get("content")
            if len(message) != 2 or not isinstance(content, str) or special.search(content):
                return None
        spans, pos = [], 0
        for i in turns:
            header, content = self._assistant_header(example, i), example.messages[i]["content"]
            if not content or not special.search(header):
                return None
            needle = header + content
            at = full.find(needle)
            if at < pos or at != full.rfind(needle):
                return None
            pos = at + len(needle)
            spans.append((at + len(header), pos))
        if self._verbatim is None:
            try:
                general = [self._diff_turn(example, full, i) for i in turns]
            except RowError:
                return None  # the general path then reports it
            self._verbatim = spans == general
            if not self._verbatim:
                logger.debug("Locating turns by a marked rendering: reading them directly gave other spans")
                return None
        return spans

    def _diff_turns_at_once(
        self, example: ChatExample, full: str, turns: list[int]
    ) -> list[tuple[int, int]] | None:
        """``_diff_turn`` for every turn from one rendering, or None where that cannot be trusted.

        Every trained turn is replaced by a marker of its own. The rendering splits at the markers
        into context pieces P0 M1 P1 ... Mk Pk; the full rendering must then read P0 T1 P1 ... Tk Pk,
        with each piece found in the same place searching from the left and from the right (so the
        turns' texts are the only way to read it). Anything else (a template whose context depends
        on what the turns say, a piece that could match in two places, a turn the template cannot
        render as plain text) gives None, and each turn is rendered on its own instead.
        """
        if len(turns) < 2:
            return None
        marker = _marker(example)
        markers = {i: f"{marker[:-1]}{k}{marker[-1]}" for k, i in enumerate(turns)}
        marked = [
            {"role": "assistant", "content": _marker_content(m, markers[j])} if j in markers else m
            for j, m in enumerate(example.messages)
        ]
        try:
            probe = self._render(example, marked, False)
        except Exception:
            return None
        pieces, rest = [], probe
        for i in turns:
            before, found, rest = rest.partition(markers[i])
            if not found:
                return None
            pieces.append(before)
        pieces.append(rest)
        inner = pieces[1:-1]
        if (
            marker[0] in "".join(pieces)  # a marker rendered twice (or out of order)
            or not all(inner)
            or not full.startswith(pieces[0])
            or not full.endswith(pieces[-1])
            or len(full) < len(pieces[0]) + len(pieces[-1])
        ):
            return None
        forward, pos = [], len(pieces[0])
        for piece in inner:
            at = full.find(piece, pos)
            if at < 0:
                return None
            forward.append((pos, at))
            pos = at + len(piece)
        last_end = len(full) - len(pieces[-1])
        if last_end < pos:
            return None
        forward.append((pos, last_end))
        backward, end = [], last_end
        for piece in reversed(inner):
            at = full.rfind(piece, 0, end)
            backward.append((at + len(piece), end))
            end = at
        backward.append((len(pieces[0]), end))
        return forward if forward == backward[::-1] else None

    def _locate_turn(
        self, example: ChatExample, full: str, i: int, header: str, pos: int, c: int, e: int
    ) -> tuple[int, int, bool]:
        """The trained span of assistant turn ``i`` whose text lies at [c, e) of the full rendering:
        it starts after what the model is prompted with and runs through the end-of-turn token
        (start, end, whether the template closes it with a token)."""
        where = f"messages[{i}]"
        if c < pos:
            raise TemplateError(
                where,
                "the chat template renders text before this assistant turn differently depending on "
                "what the turn says, so the turn's tokens cannot be told apart from its context",
            )
        start = self._past_empty_reasoning(
            example, full, i, self._turn_start(example, full, i, header, pos, c, e), c
        )
        end, closed = self._close_turn(example, full, e, header)
        message = example.messages[i]
        calls = [call.get("function", call).get("name", "") for call in message.get("tool_calls", [])]
        missing = [name for name in calls if name not in full[start:end]]
        if missing:
            raise TemplateError(
                where,
                f"the chat template does not render this turn's tool call ({missing[0]}): it has no "
                "tool-call support (or it tests for a null `content`, which transformers does not pass "
                "to templates). Use a chat_template that renders `tool_calls`, or write the call into "
                "the message content in the form the model expects",
            )
        if e <= c and message.get("content"):
            raise TemplateError(
                where,
                "the chat template does not render this assistant turn in the finished conversation, "
                "so there is nothing to train on for it; set split_turns=true to train each turn with "
                "the history rendered as at inference",
            )
        return start, end, closed

    def _turn_start(
        self, example: ChatExample, full: str, i: int, header: str, pos: int, c: int, e: int
    ) -> int:
        """Where the trained text of turn ``i`` starts: right after what the model is prompted with.

        When the prompt rendered as at inference is a prefix of the conversation (most templates),
        that is exact: template glue between the prompt and the answer (Llama-2's space after
        [/INST]) is trained, since the model generates it. Otherwise (a history rewritten once later
        turns follow, a generation prompt that opens a think block) the turn starts after its
        assistant header, found before the turn's own text.
        """
        prompt = None
        if i > 0 and header and full.find(header, max(0, pos - len(header)), c) == c - len(header):
            # The answer follows its header, the only one since the previous turn: a prompt that is a
            # prefix of the conversation ends with that header (the generation prompt), so it ends at
            # c, which is also where the header search below ends. No need to render it.
            return c
        if i > 0:
            try:
                prompt = self._render(example, example.messages[:i], True)
            except Exception:
                prompt = None
            # A generation prompt the conversation starts with is the prompt, also where it ends
            # past where the turn's rendering first differs from a plain answer's (Command R7B
            # prompts '<|START_THINKING|><|END_THINKING|>', which a call turn also renders).
            if prompt is not None and pos <= len(prompt) < max(c + 1, e) and full.startswith(prompt):
                return len(prompt)
            for other in self._thinking_prompts(example, i, prompt):
                if pos <= len(other) < max(c + 1, e) and full.startswith(other):
                    return len(other)
        if not header and prompt is not None:
            # No header (Mistral, Llama-2): whitespace before the answer is trained as in the prefix
            # case, except what the prompt itself ends with.
            glue = len(full[pos:c]) - len(full[pos:c].rstrip())
            return c - glue + min(glue, len(prompt) - len(prompt.rstrip()))
        if header:
            found = full.rfind(header, pos, c)
            if found < 0:  # "<|im_start|>assistant\n<think>\n" prompted, no think block rendered
                first_line = header.split("\n", 1)[0] + ("\n" if "\n" in header else "")
                found = full.rfind(first_line, pos, c) if first_line != header else -1
                header = first_line
            if found >= 0:
                return found + len(header)
        if prompt is not None:  # where prompt and conversation part: what the model was prompted with
            shared = self._outside_special(full, _common_prefix(prompt, full))
            if pos <= shared <= c:
                return shared
        return c

    def _past_empty_reasoning(self, example: ChatExample, full: str, i: int, start: int, c: int) -> int:
        """``c`` where what lies between the prompt and turn ``i``'s own text is the template's
        reasoning block written empty (Qwen3's ``<think>\n\n</think>\n\n`` before an answer that
        carries no reasoning), else ``start``. That block is context: in non-thinking mode it is the
        end of the generation prompt, and in thinking mode the model writes its reasoning there;
        training it empty teaches the model to skip thinking. Found by rendering the turn with a
        reasoning sentinel: the template must put it between ``start`` and ``c`` and render the
        rest exactly as without it. ``train_empty_reasoning`` keeps the block trained."""
        message = example.messages[i]
        if self.train_empty_reasoning or start >= c or message.get("reasoning_content"):
            return start
        sentinel = _marker(example)
        with_reasoning = [
            *example.messages[:i],
            {**message, "reasoning_content": sentinel},
            *example.messages[i + 1 :],
        ]
        try:
            rendered = self._render(example, with_reasoning, False)
        except Exception:
            return start
        at = rendered.find(sentinel)
        if not start <= at <= c or rendered[:at] + rendered[at + len(sentinel) :] != full:
            return start
        self.untrained_empty_reasoning += 1
        return c

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
        shared = after_last[: self._outside_special(after_last, _common_prefix(after_last, after_followed))]
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

    # ---- tokens -----------------------------------------------------------------------------

    def tokenize(self, examples: Sequence[Example]) -> list[Tokenized]:
        """Tokenize a batch: its rows, in order (an example whose turns cannot share a row gives
        more than one). Raises ``RowError`` for a row the chat template cannot render."""
        encoded = self.encode([(ex, self.segments(ex)) for ex in examples])
        return [row for rows in encoded for row in rows]

    def encode(self, rows: Sequence[tuple[Example, list[Segment]]]) -> list[list[Tokenized]]:
        """Tokenize already rendered rows in batched tokenizer calls; per row, its output rows."""
        return self.encoder.encode([(isinstance(ex, ChatExample), segs) for ex, segs in rows])


def _calls_tools(messages: list[dict[str, Any]], i: int) -> bool:
    """Whether assistant turn ``i`` calls tools, or tool results follow it."""
    return bool(messages[i].get("tool_calls")) or (
        i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
    )


def _call_id(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls") or [{}]
    return str(calls[-1].get("id", "call0"))


def _plain_text(messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> bool:
    """Messages of only a role and a text, and template variables of plain values: what a template
    is given as they are (nothing to convert or drop, no reasoning to alias)."""
    return all(
        len(m) == 2 and type(m.get("role")) is str and type(m.get("content")) is str for m in messages
    ) and all(v is None or type(v) in (str, int, float, bool) for v in kwargs.values())


def _renders_whole_turn(message: dict[str, Any], span: str) -> bool:
    """Whether a turn's reasoning and text both appear in its rendered span (templates may trim)."""
    content = message.get("content")
    if isinstance(content, list):  # typed parts: the text parts (images render as placeholders)
        content = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    texts = (message.get("reasoning_content"), *(content if isinstance(content, list) else [content]))
    return all(text.strip() in span for text in texts if isinstance(text, str))


# Unicode noncharacters (U+FDD0-U+FDEF): a turn marker opens and closes with two that the conversation
# does not hold, so where the marker starts and ends can never be mistaken for text of the turn.
MARKER_CHARS = tuple(chr(c) for c in range(0xFDD0, 0xFDF0))


def _marker(example: ChatExample) -> str:
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


def _marked_conversations(messages: list[dict[str, Any]], i: int, marker: str) -> list[list[dict[str, Any]]]:
    """The conversation with assistant turn ``i`` replaced by ``marker``, in the forms to try.

    First a plain turn holding the marker (as one text part when the turn's content is a list of
    parts): reasoning, text and tool calls all differ from it. For
    templates that refuse a tool result with no call before it, a turn that keeps its calls with
    marked arguments.
    """
    plain = {"role": "assistant", "content": _marker_content(messages[i], marker)}
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


def _marker_content(message: dict[str, Any], marker: str) -> str | list[dict[str, str]]:
    """A marker as the content of ``message``: one text part where its content is a list of typed
    parts (vision-language templates iterate over parts), the plain string otherwise."""
    return [{"type": "text", "text": marker}] if isinstance(message.get("content"), list) else marker


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search: string comparisons run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: str, b: str, limit: int) -> int:
    return _common_prefix(a[::-1][:limit], b[::-1][:limit])


def tokenize_pretokenized(row: dict[str, Any], max_length: int | None, use_masks: bool = True) -> Tokenized:
    """Validate a row that already has ``input_ids``, and give it ``labels``.

    Given ``labels`` are used as they are. Otherwise, with ``use_masks``, the 0/1 columns TRL's data
    preparation writes (``completion_mask``, ``assistant_masks``) decide which tokens are trained: a
    token is trained where every mask present is 1. Without masks every token is trained.
    """
    ids = row.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
        raise RowError("input_ids", "must be a non-empty list of integers")
    labels = row.get("labels")
    if labels is None:
        labels = list(ids)
        masks = [name for name in LOSS_MASK_COLUMNS if row.get(name) is not None] if use_masks else []
        for name in masks:
            mask = row[name]
            if not isinstance(mask, list) or len(mask) != len(ids):
                raise RowError(name, f"must be a list as long as input_ids ({len(ids)}), got {_len(mask)}")
            labels = [label if bit else IGNORE_INDEX for label, bit in zip(labels, mask)]
    elif not isinstance(labels, list) or len(labels) != len(ids):
        raise RowError("labels", f"must be a list as long as input_ids ({len(ids)}), got {_len(labels)}")
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return Tokenized(list(ids), list(labels), truncated)


def _len(value: Any) -> str:
    return f"length {len(value)}" if isinstance(value, list) else type(value).__name__
