"""Examples -> ``input_ids`` + ``labels`` with the loss exactly on the trained tokens.

An example is first rendered into *segments*: consecutive pieces of text, each trained or not.
Chat templates are handled without ``{% generation %}`` markers: the text is the template's rendering
of the whole conversation, and each assistant turn is located in it by rendering the conversation
again with that turn replaced by a marker (see ``_locate_turn``), so any template works, including
ones that rewrite history or whose generation prompt differs from the finished conversation. Where
the rendering visibly writes every trained turn as given, behind its header, the turns are read from
it directly and the second rendering is skipped (``_verbatim_spans``).

The text is then tokenized once, in a batch. When no token crosses a boundary between a trained and
an untrained segment (the usual case: templates end a prompt with a special token or a newline),
labels come from where the tokens end, and the tokens are exactly those of tokenizing the whole
conversation. Where the tokens end is read from the ids of a byte-level BPE tokenizer that changes
no text (``token_bytes``: a quarter of the tokenizer's time saved), from offsets otherwise. When a token would cross a boundary (BPE merging the prompt's tail into the response),
the row is tokenized segment by segment instead, so no prompt token is lost or merged.

Output rows (``tokenize_examples``): ``input_ids`` list[int], ``labels`` list[int] with
``IGNORE_INDEX`` on every untrained token. ``labels`` are aligned with ``input_ids`` (not shifted).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from transformers.utils.chat_template_utils import render_jinja_template

try:  # the compiled, cached template render_jinja_template renders with (private: used where present)
    from transformers.utils.chat_template_utils import _compile_jinja_template as _compiled_template
except ImportError:  # pragma: no cover - another transformers
    _compiled_template = None

from sftrainer.constants import BYTES_CHECKED_ROWS, IGNORE_INDEX, LOSS_MASK_COLUMNS
from sftrainer.data.formats import ChatExample, Example, PairExample, TextExample
from sftrainer.data.token_bytes import ByteLengths
from sftrainer.errors import RowError, TemplateError

logger = logging.getLogger(__name__)

Segment = tuple[str, bool]  # (text, trained)


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss. The first label is never predicted (nothing precedes it)."""
        return max(0, len(self.labels) - 1 - self.labels[1:].count(IGNORE_INDEX))


class ExampleTokenizer:
    """Tokenizes examples for one tokenizer and one set of settings. Picklable for ``num_proc``."""

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on = train_on
        self.template_kwargs = dict(template_kwargs or {})
        self._headers: dict[tuple[Any, ...], str] = {}
        self._opens: dict[str, frozenset[str | None]] = {}
        self._warned_null_content = False
        # The template to use, keyed by "has no tools"; whether direct rendering matched, keyed by
        # "has no tools" and "plain text" (_plain_text).
        self._templates: dict[bool, str] = {}
        self._direct: dict[tuple[bool, bool], bool] = {}
        # Whether turns found by _verbatim_spans matched the marked rendering (checked once).
        self._verbatim: bool | None = None
        # Whether token counts read from ids (token_bytes) matched offsets (checked once).
        self._bytes_trusted: bool | None = None

    @cached_property
    def _byte_lengths(self) -> ByteLengths | None:
        """Token counts read from ids, where this tokenizer allows it (built when first needed)."""
        return ByteLengths.of(self.tokenizer)

    @cached_property
    def _special_tokens(self) -> dict[str, str]:
        return dict(self.tokenizer.special_tokens_map)

    @cached_property
    def bos_id(self) -> int | None:
        """The BOS id if this tokenizer adds one to plain text (Llama, Gemma), else None (Qwen, GPT-2)."""
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return None
        ids = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        return bos if ids and ids[0] == bos else None

    @cached_property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id  # prepare() refuses a tokenizer without one

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that can end a turn: special and added tokens (``<|im_end|>``, ``<end_of_turn>``, EOS)."""
        ids = set(self.tokenizer.all_special_ids)
        ids.update(self.tokenizer.added_tokens_decoder)
        return frozenset(ids)

    @cached_property
    def special_texts(self) -> list[str]:
        """The text of every special / added token, longest first (so "<|end|>" loses to "<|endoftext|>")."""
        texts = {self.tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids}
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
            return [(example.text, True)], 0
        if isinstance(example, PairExample):
            return [(example.prompt, self.train_on == "all"), (example.completion, True)], 0
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
            return [s for s in ((full[:end], True), (full[end:], False)) if s[0]], 0
        turns = [
            i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.first_trainable
        ]
        if self.train_on == "last_turn":
            turns = turns[-1:]
        if not turns:
            return [(full, False)], 0
        spans = self._verbatim_spans(example, full, turns) or self._diff_turns_at_once(example, full, turns)
        if spans is not None:
            try:
                return self._turn_segments(example, full, turns, spans)
            except (RowError, TemplateError):
                pass  # decided turn by turn below, as the message then names the turn at fault
        return self._turn_segments(example, full, turns, None)

    def _turn_segments(
        self, example: ChatExample, full: str, turns: list[int], spans: list[tuple[int, int]] | None
    ) -> tuple[list[Segment], int]:
        segments: list[Segment] = []
        pos = rewritten = 0
        for k, i in enumerate(turns):
            c, e = spans[k] if spans is not None else self._diff_turn(example, full, i)
            start, end = self._locate_turn(example, full, i, self._assistant_header(example, i), pos, c, e)
            segments += [(full[pos:start], False), (full[start:end], True)]
            rewritten += not _renders_whole_turn(example.messages[i], full[start:end])
            pos = end
        segments.append((full[pos:], False))
        return [s for s in segments if s[0]], rewritten

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
        for marked in _marked_conversations(example.messages, i):
            try:
                probe = self._render(example, marked, False)
                break
            except Exception as err:  # e.g. a tool result must follow a tool call: try the next
                error = err
        if probe is None:
            raise RowError(where, f"the chat template cannot render this conversation: {error}") from None
        c = _common_prefix(full, probe)
        return c, len(full) - _common_suffix(full, probe, limit=min(len(full), len(probe)) - c)

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
        markers = {i: f"{MARKER[:-1]}{k}{MARKER[-1]}" for k, i in enumerate(turns)}
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
            MARKER[0] in "".join(pieces)  # a marker rendered twice (or out of order)
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
    ) -> tuple[int, int]:
        """The trained span of assistant turn ``i`` whose text lies at [c, e) of the full rendering:
        it starts after what the model is prompted with and runs through the end-of-turn token."""
        where = f"messages[{i}]"
        if c < pos:
            raise TemplateError(
                where,
                "the chat template renders text before this assistant turn differently depending on "
                "what the turn says, so the turn's tokens cannot be told apart from its context",
            )
        start, end = self._turn_start(example, full, i, header, pos, c), self._close_turn(full, e, header)
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
        return start, end

    def _turn_start(self, example: ChatExample, full: str, i: int, header: str, pos: int, c: int) -> int:
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
            if prompt is not None and pos <= len(prompt) <= c and full.startswith(prompt):
                return len(prompt)
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
        return c

    def _close_turn(self, full: str, e: int, header: str) -> int:
        """The end of a turn whose text ends at ``e``: through the end-of-turn token that follows
        (after whitespace, or the closing quotes and brackets of tool-call JSON), or ``e`` itself
        when no special token follows. BOS and the token that opens a turn header (``<|im_start|>``
        in a template with no end-of-turn token) begin the next turn: they do not close this one."""
        k = e
        while k < len(full) and full[k] in " \t\n\"'}])`":
            k += 1
        found = self._special_pattern.match(full, k) if self._special_pattern is not None else None
        if found is None:
            return e
        opens = self._opening_tokens(header)
        if found.group() not in opens:  # the longest special token there, as in the loop below
            return found.end()
        for token in self.special_texts:
            if token not in opens and full.startswith(token, k):
                return k + len(token)
        return e

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
        """Tokenize a batch. Raises ``RowError`` for a row the chat template cannot render."""
        return self.encode([(ex, self.segments(ex)) for ex in examples])

    def encode(self, rows: Sequence[tuple[Example, list[Segment]]]) -> list[Tokenized]:
        """Tokenize already rendered rows in one batched tokenizer call."""
        if not rows:  # a batch whose rows were all invalid; tokenizers fail on an empty batch
            return []
        merged = [_merge_same(segs) for _, segs in rows]
        if not getattr(self.tokenizer, "is_fast", False):  # no offsets: tokenize piece by piece
            return [
                self._finish(ex, segs, *self._tokenize_segmentwise(segs))
                for (ex, _), segs in zip(rows, merged)
            ]
        texts = ["".join(text for text, _ in segs) for segs in merged]
        found = self._counts_from_bytes(texts, merged)
        missing = [k for k, got in enumerate(found) if got is None]
        if missing:
            by_offsets = self._counts_from_offsets([texts[k] for k in missing], [merged[k] for k in missing])
            for k, got in zip(missing, by_offsets):
                found[k] = got
        return [self._finish(ex, segs, *got) for (ex, _), segs, got in zip(rows, merged, found)]

    def _counts_from_offsets(
        self, texts: list[str], merged: list[list[Segment]]
    ) -> list[tuple[list[int], list[int]]]:
        """Each text's ids and its segments' token counts, from the tokenizer's offsets (segment by
        segment where a token crosses a boundary)."""
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,  # not used: converting it to lists costs a quarter of the call
            return_token_type_ids=False,
        )
        out = []
        for k, segs in enumerate(merged):
            ids = enc["input_ids"][k]
            counts = _segment_token_counts(enc.encodings[k], segs, len(ids))
            out.append((ids, counts) if counts is not None else self._tokenize_segmentwise(segs))
        return out

    def _counts_from_bytes(
        self, texts: list[str], merged: list[list[Segment]]
    ) -> list[tuple[list[int], list[int]] | None]:
        """``_counts_from_offsets`` read from the ids alone (``token_bytes``) where the tokenizer
        allows it; None for each row that must be read from offsets. The first rows of the first batch
        are read both ways: where any differs (or none could be read), this encoder uses offsets for
        good."""
        if self._byte_lengths is None or self._bytes_trusted is False:
            return [None] * len(texts)
        ids = self._byte_lengths.encode(texts)
        if ids is None:
            return [None] * len(texts)
        found = [
            (row, counts) if (counts := self._byte_lengths.counts(text, row, [t for t, _ in segs])) else None
            for text, row, segs in zip(texts, ids, merged)
        ]
        if self._bytes_trusted is None:
            n = BYTES_CHECKED_ROWS
            reference = self._counts_from_offsets(texts[:n], merged[:n])
            self._bytes_trusted = any(found[:n]) and all(
                f is None or f == r for f, r in zip(found, reference)
            )
            if not self._bytes_trusted:
                logger.debug("Reading token counts from offsets: reading them from the ids gave others")
                return [*reference, *([None] * len(found[n:]))]
            return [*reference, *found[n:]]
        return found

    def _tokenize_segmentwise(self, segs: list[Segment]) -> tuple[list[int], list[int]]:
        """The ids of the segments tokenized one after the other, and each segment's token count."""
        pieces = self._tokenize_pieces([text for text, _ in segs])
        return [t for piece in pieces for t in piece], [len(piece) for piece in pieces]

    def _tokenize_pieces(self, texts: list[str]) -> list[list[int]]:
        """Tokenize consecutive pieces of one text, each piece after the first as a continuation.

        SentencePiece-style tokenizers (Metaspace, prepend_scheme="first") put a "▁" before text that
        starts an input, so a piece tokenized alone would gain a space the text does not have. After a
        special token they add nothing, so later pieces are tokenized behind EOS, which is then dropped.
        """
        eos = self.tokenizer.eos_token
        rest = [eos + text for text in texts[1:]] if eos else texts[1:]
        enc = self.tokenizer([texts[0], *rest], add_special_tokens=False)["input_ids"]
        out = [enc[0]]
        for text, piece in zip(texts[1:], enc[1:]):
            if eos and piece[:1] == [self.eos_id]:
                out.append(piece[1:])
            else:  # EOS is not split off as one token here: tokenize the piece alone
                out.append(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return out

    def _finish(self, example: Example, segs: list[Segment], ids: list[int], counts: list[int]) -> Tokenized:
        """Labels from the segments' token counts; every trained span of a conversation ends with a
        stop token (a template without an end-of-turn token would never teach the model to stop: EOS
        is added), text and pairs end with EOS; BOS once at the start; truncation."""
        runs: list[list[Any]] = []  # [trained, tokens]: consecutive segments with tokens, merged
        for (_, trained), n in zip(segs, counts):
            if n and runs and runs[-1][0] == trained:
                runs[-1][1] += n
            elif n:
                runs.append([trained, n])
        close_spans = isinstance(example, ChatExample)
        out_ids: list[int] = []
        labels: list[int] = []
        pos = 0
        for trained, n in runs:
            piece = ids[pos : pos + n]
            pos += n
            out_ids += piece
            if not trained:
                labels += [IGNORE_INDEX] * n
                continue
            labels += piece
            if close_spans and piece[-1] not in self.stop_ids:
                out_ids.append(self.eos_id)
                labels.append(self.eos_id)
        if not close_spans and (not out_ids or out_ids[-1] != self.eos_id):
            out_ids.append(self.eos_id)
            labels.append(self.eos_id)
        if self.bos_id is not None and (not out_ids or out_ids[0] != self.bos_id):
            out_ids.insert(0, self.bos_id)
            labels.insert(0, IGNORE_INDEX)
        truncated = self.max_length is not None and len(out_ids) > self.max_length
        if truncated:
            out_ids, labels = out_ids[: self.max_length], labels[: self.max_length]
        return Tokenized(out_ids, labels, truncated)


def _segment_token_counts(encoding: Any, segs: list[Segment], n_tokens: int) -> list[int] | None:
    """Tokens per segment of a text tokenized whole, or None when a token crosses a boundary.

    A boundary is clean when a token starts exactly there and the token before it ends exactly
    there. Checking both sides also catches tokenizers that trim offsets (a token " Paris" reported
    as starting at "P" while it really swallowed the prompt's trailing space).
    """
    counts, pos, previous = [], 0, 0
    for text, _ in segs[:-1]:
        pos += len(text)
        t = encoding.char_to_token(pos)
        if (
            t is None
            or t == 0
            or encoding.token_to_chars(t)[0] != pos
            or encoding.token_to_chars(t - 1)[1] != pos
        ):
            return None
        counts.append(t - previous)
        previous = t
    counts.append(n_tokens - previous)
    return counts


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


MARKER = "\ufdd0sftrainer-turn\ufdd1"  # Unicode noncharacters: never in real text


def _marked_conversations(messages: list[dict[str, Any]], i: int) -> list[list[dict[str, Any]]]:
    """The conversation with assistant turn ``i`` replaced by markers, in the forms to try.

    First a plain turn holding ``MARKER`` (as one text part when the turn's content is a list of
    parts): reasoning, text and tool calls all differ from it. For
    templates that refuse a tool result with no call before it, a turn that keeps its calls with
    marked arguments.
    """
    plain = {"role": "assistant", "content": _marker_content(messages[i], MARKER)}
    out = [[*messages[:i], plain, *messages[i + 1 :]]]
    calls = messages[i].get("tool_calls")
    if calls:
        marked_calls = [
            {**call, "function": {**call["function"], "arguments": {"marker": MARKER}}}
            if "function" in call
            else {**call, "arguments": {"marker": MARKER}}
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


def _merge_same(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


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
