"""Where each trained turn lies in a rendered example: examples -> text segments, each trained or not.

Chat templates are handled without ``{% generation %}`` markers: the text is the template's rendering
of the whole conversation, and each assistant turn is located in it by rendering the conversation
again with that turn replaced by a marker (see ``_locate_turn``), so any template works, including
ones that rewrite history or whose generation prompt differs from the finished conversation. Where
the rendering visibly writes every trained turn as given, behind its header, the turns are read from
it directly and the second rendering is skipped (``_verbatim_spans``).

A turn ends with the token the template closes it with (``_close_turn``: the end-of-turn token, or the
token generation stops on, such as GLM's ``<|observation|>`` after a tool call; the template's markup is
``sftrainer.data.render``'s); whether a token closes
it is carried on its ``Segment`` (``closed``), so the encoder knows where EOS is needed. Text that a
template writes inside the assistant's turn but that the model does not generate (tool results, in
Gemma 4) is split out of the trained span (``_cut_at_tool_results``).

Contract: ``TurnLocator.segments(example)`` -> ``list[Segment]`` whose texts concatenate to the full
rendering; rendering itself is ``sftrainer.data.render``'s, ids and labels ``sftrainer.data.tokenize``'s.
"""

from __future__ import annotations

import logging
from typing import Any

from sftrainer.data.encode import Segment
from sftrainer.data.formats import ChatExample, Example, PairExample, TextExample
from sftrainer.data.render import (
    MARKER_CHARS,
    ChatRenderer,
    common_prefix,
    common_suffix,
    marked_conversations,
    marker_content,
    turn_marker,
)
from sftrainer.errors import RowError, TemplateError

logger = logging.getLogger(__name__)


class TurnLocator(ChatRenderer):
    """Renders examples into segments (trained or not) for one tokenizer and settings. Picklable."""

    def __init__(
        self,
        tokenizer: Any,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
        train_empty_reasoning: bool = False,
    ):
        super().__init__(tokenizer, template_kwargs)
        self.train_on = train_on
        self.train_empty_reasoning = train_empty_reasoning
        # Assistant turns whose empty reasoning block, written by the template, was left untrained
        # (_past_empty_reasoning): a running count the data pipeline reads per row.
        self.untrained_empty_reasoning = 0
        # Whether turns found by _verbatim_spans matched the marked rendering (checked once).
        self._verbatim: bool | None = None

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
            return [Segment(full, False)], 0
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
        shared = self._outside_special(upto, common_prefix(upto, full))
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

    def _diff_turn(self, example: ChatExample, full: str, i: int) -> tuple[int, int]:
        """Where the template's text for assistant turn ``i`` lies in the full rendering (c, e).

        The conversation is rendered again with this turn replaced by a marker; the renderings
        agree before and after the turn, and differ exactly where the template put its text
        (reasoning, content and tool calls). This finds every turn a finished conversation holds,
        whatever the template does to history or after the last turn.
        """
        where = f"messages[{i}]"
        probe = None
        for marked in marked_conversations(example.messages, i, turn_marker(example)):
            try:
                probe = self._render(example, marked, False)
                break
            except Exception as err:  # e.g. a tool result must follow a tool call: try the next
                error = err
        if probe is None:
            raise RowError(where, f"the chat template cannot render this conversation: {error}") from None
        c = common_prefix(full, probe)
        e = len(full) - common_suffix(full, probe, limit=min(len(full), len(probe)) - c)
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
        marker = turn_marker(example)
        markers = {i: f"{marker[:-1]}{k}{marker[-1]}" for k, i in enumerate(turns)}
        marked = [
            {"role": "assistant", "content": marker_content(m, markers[j])} if j in markers else m
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
            shared = self._outside_special(full, common_prefix(prompt, full))
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
        sentinel = turn_marker(example)
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


def _calls_tools(messages: list[dict[str, Any]], i: int) -> bool:
    """Whether assistant turn ``i`` calls tools, or tool results follow it."""
    return bool(messages[i].get("tool_calls")) or (
        i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
    )


def _call_id(message: dict[str, Any]) -> str:
    calls = message.get("tool_calls") or [{}]
    return str(calls[-1].get("id", "call0"))


def _renders_whole_turn(message: dict[str, Any], span: str) -> bool:
    """Whether a turn's reasoning and text both appear in its rendered span (templates may trim)."""
    content = message.get("content")
    if isinstance(content, list):  # typed parts: the text parts (images render as placeholders)
        content = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
    texts = (message.get("reasoning_content"), *(content if isinstance(content, list) else [content]))
    return all(text.strip() in span for text in texts if isinstance(text, str))
