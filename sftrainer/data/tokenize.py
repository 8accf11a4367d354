"""Examples -> ``input_ids`` + ``labels`` with the loss exactly on the trained tokens.

An example is first rendered into *segments*: consecutive pieces of text, each trained or not.
Chat templates are handled without ``{% generation %}`` markers: the conversation is rendered up to
each assistant turn (with the generation prompt) and through it, and the difference of the two
prefixes is that turn's text, so any template works.

The text is then tokenized once, in a batch, with offsets. When no token crosses a boundary between
a trained and an untrained segment (the usual case: templates end a prompt with a special token or a
newline), labels come from the offsets and the tokens are exactly those of tokenizing the whole
conversation. When a token would cross a boundary (BPE merging the prompt's tail into the response),
the row is tokenized segment by segment instead, so no prompt token is lost or merged.

Output rows (``tokenize_examples``): ``input_ids`` list[int], ``labels`` list[int] with
``IGNORE_INDEX`` on every untrained token. ``labels`` are aligned with ``input_ids`` (not shifted).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sftrainer.constants import IGNORE_INDEX, LOSS_MASK_COLUMNS
from sftrainer.data.formats import ChatExample, Example, PairExample, TextExample
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
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


class ExampleTokenizer:
    """Tokenizes examples for one tokenizer and one set of settings. Picklable for ``num_proc``."""

    def __init__(self, tokenizer: Any, max_length: int | None = None, train_on: str = "response"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.train_on = train_on

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

    # ---- segments ---------------------------------------------------------------------------

    def segments(self, example: Example) -> list[Segment]:
        """Render an example into text segments, each marked trained or not."""
        if isinstance(example, TextExample):
            return [(example.text, True)]
        if isinstance(example, PairExample):
            return [(example.prompt, self.train_on == "all"), (example.completion, True)]
        return self._chat_segments(example)

    def _render(self, example: ChatExample, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=example.tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _chat_segments(self, example: ChatExample) -> list[Segment]:
        messages = example.messages
        try:
            full = self._render(example, messages, False)
        except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
            raise RowError("messages", f"the chat template rejected this conversation: {err}") from None
        if self.train_on == "all":  # trailing whitespace untrained, as after every turn below
            end = len(full.rstrip())
            return [s for s in ((full[:end], True), (full[end:], False)) if s[0]]
        turns = [
            i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= example.first_trainable
        ]
        if self.train_on == "last_turn":
            turns = turns[-1:]
        segments: list[Segment] = []
        pos = 0
        for i in turns:
            try:
                before = self._render(example, messages[:i], True) if i > 0 else ""
                through = self._render(example, messages[: i + 1], False)
                # The text after this turn when the conversation goes on: a finished conversation may
                # end with text that is not part of the last turn (Phi-3 appends EOS after <|end|>).
                follow = full if i + 1 < len(messages) else self._render(example, messages[: i + 1], True)
            except Exception as err:
                raise RowError(
                    f"messages[{i}]", f"the chat template cannot render up to this turn: {err}"
                ) from None
            start, end = len(before), self._turn_end(through, follow)
            # Where the renderings part ways, make sure the answer itself is inside the turn found.
            located = follow.startswith(through) or messages[i]["content"].strip() in full[start:end]
            if not (
                full.startswith(before) and full.startswith(through[:end]) and pos <= start < end and located
            ):
                raise TemplateError(
                    f"messages[{i}]",
                    "the chat template renders earlier turns differently once later turns follow (for "
                    "example it drops reasoning from past turns), so the assistant text cannot be located. "
                    "Use train_on=last_turn, or a chat_template that renders history unchanged.",
                )
            segments += [(full[pos:start], False), (full[start:end], True)]
            pos = end
        segments.append((full[pos:], False))
        return [s for s in segments if s[0]]

    def _turn_end(self, through: str, follow: str) -> int:
        """End of the turn that ``through`` ends with: where it and its continuation ``follow`` part.

        Trailing whitespace after the end-of-turn token (ChatML's "\\n") belongs to the next turn.
        Where the two part inside the template's own text (Phi-3: "<|end|>\\n<|endoftext|>" against
        "<|end|>\\n<|user|>"), the end moves back to a token boundary, so it never splits "<|".
        """
        if follow.startswith(through):
            return len(through.rstrip())
        if not getattr(self.tokenizer, "is_fast", False):
            return -1  # no offsets to find a token boundary: the caller reports the template
        cut = next((k for k, (a, b) in enumerate(zip(through, follow)) if a != b), len(through))
        offsets = self.tokenizer(through, add_special_tokens=False, return_offsets_mapping=True)
        cut = max((e for _, e in offsets["offset_mapping"] if e <= cut), default=0)
        return len(through[:cut].rstrip())

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
                self._finish(ex, *self._tokenize_segmentwise(segs)) for (ex, _), segs in zip(rows, merged)
            ]
        texts = ["".join(text for text, _ in segs) for segs in merged]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for (example, _), segs, ids, offsets in zip(rows, merged, enc["input_ids"], enc["offset_mapping"]):
            ends = _segment_ends(segs)
            if _boundaries_clean(offsets, ends[:-1]):
                last = len(segs) - 1
                seg_of = [min(bisect.bisect_right(ends, start), last) for start, _ in offsets]
                labels = [tok if segs[s][1] else IGNORE_INDEX for tok, s in zip(ids, seg_of)]
            else:
                ids, labels = self._tokenize_segmentwise(segs)
            out.append(self._finish(example, list(ids), labels))
        return out

    def _tokenize_segmentwise(self, segs: list[Segment]) -> tuple[list[int], list[int]]:
        enc = self._tokenize_pieces([text for text, _ in segs])
        ids: list[int] = []
        labels: list[int] = []
        for (_, trained), seg_ids in zip(segs, enc):
            ids += seg_ids
            labels += seg_ids if trained else [IGNORE_INDEX] * len(seg_ids)
        return ids, labels

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

    def _finish(self, example: Example, ids: list[int], labels: list[int]) -> Tokenized:
        """Add BOS once, make sure every trained span ends with a stop token, truncate."""
        if isinstance(example, TextExample | PairExample):
            if not ids or ids[-1] != self.eos_id:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
        else:
            ids, labels = self._close_trained_spans(ids, labels)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
            labels.insert(0, IGNORE_INDEX)
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Tokenized(ids, labels, truncated)

    def _close_trained_spans(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        """A template without an end-of-turn token would never teach the model to stop: add EOS."""
        out_ids: list[int] = []
        out_labels: list[int] = []
        for k, (tok, label) in enumerate(zip(ids, labels)):
            out_ids.append(tok)
            out_labels.append(label)
            span_ends = label != IGNORE_INDEX and (k + 1 == len(ids) or labels[k + 1] == IGNORE_INDEX)
            if span_ends and tok not in self.stop_ids:
                out_ids.append(self.eos_id)
                out_labels.append(self.eos_id)
        return out_ids, out_labels


def _merge_same(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for text, trained in segments:
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


def _segment_ends(segments: list[Segment]) -> list[int]:
    ends, pos = [], 0
    for text, _ in segments:
        pos += len(text)
        ends.append(pos)
    return ends


def _boundaries_clean(offsets: Sequence[Sequence[int]], boundaries: Sequence[int]) -> bool:
    """True when, at each boundary, one token ends exactly there and the next starts exactly there.

    Checking both sides also catches tokenizers that trim offsets (a token " Paris" reported as
    starting at "P" while it really swallowed the prompt's trailing space).
    """
    if not boundaries:
        return True
    starts = {s for s, _ in offsets}
    ends = {e for _, e in offsets}
    return all(b in starts and b in ends for b in boundaries)


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
