"""Rendered segments -> the token ids the model sees at inference, and labels.

A row arrives as *segments*: consecutive pieces of its text, each trained or not (``tokenize.py``
renders them). Whatever the tokenizer, the ids hold to this contract:

- the ids before each trained span are the ids inference gives that prompt: its text tokenized
  alone (``add_special_tokens=False``, BOS put first where the tokenizer adds one, as
  ``generate.prompt_ids`` does);
- a trained span's ids continue those ids and decode, after them, to exactly the span's text;
- a conversation's trained span that its template does not close (``Segment.closed``) gets EOS;
  text and pairs end with EOS.

Tokenizing the whole text once gives exactly these ids for nearly every row. That is checked, not
assumed (``_from_whole``): a token must end at every boundary between trained and untrained text, and
the tokens before each trained span must equal its prompt tokenized alone. A tokenizer tokenizes the
text between two added tokens on its own, so only the prompt's *tail*, the text after its last added
token, is tokenized again, behind that token; tails repeat (``<|im_start|>`` + ``assistant\\n``) and
are cached. Where no added token precedes the span (raw prompt/completion pairs), the prompt is
tokenized alone.

Rows that fail a check are built turn by turn (``_exact``): each prompt tokenized alone, each answer
as its continuation (``_continuation``). That handles the ways one tokenization of the whole text
differs from inference: a token that crosses the boundary (SentencePiece ``]{``, ``▁return`` for
``ret|urn``), a prompt whose last tokens change when text follows (GPT-2 ``\\n\\n``, Llama-3's
``ignore_merges``), and a "▁" a SentencePiece tokenizer puts before text it sees first or after a
special token. Every answer built this way is checked by decoding: prompt + answer must decode to
what the whole text decodes to. Where an earlier answer, as trained, tokenizes differently inside a
later prompt (or EOS was added after it), no one row can match inference for both turns: the row
ends after the earlier turn and the later one starts a row of its own (``split_rows``; the vision
path, whose images follow rows, keeps one row and counts it as ``inexact``).

Output (``encode``): per input row, one or more ``Tokenized`` rows: ``input_ids`` list[int], ``labels``
list[int] with ``IGNORE_INDEX`` on every untrained token, aligned with ``input_ids`` (not shifted).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

from sftrainer.constants import BYTES_CHECKED_ROWS, CACHED_TAIL_CHARS, CACHED_TAILS, IGNORE_INDEX
from sftrainer.data.token_bytes import ByteLengths

logger = logging.getLogger(__name__)


class Segment(NamedTuple):
    """A piece of a row's text. ``closed``: a trained turn that ends with the token its template
    closes turns with (the end-of-turn token, or GLM's ``<|observation|>``): no EOS is added after it."""

    text: str
    trained: bool
    closed: bool = False


# Text put before a piece so that it is tokenized as a continuation, not as the start of an input.
SENTINELS = ("\n", " ", "a", "0", ".")
LAST_ADDED_WINDOW = 512  # characters of a prompt searched first for its last added token


@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]
    truncated: bool
    inexact: bool = False  # a later prompt's tokens differ from inference (one row kept: vision)

    @property
    def n_trained(self) -> int:
        """Tokens that carry loss. The first label is never predicted (nothing precedes it)."""
        return max(0, len(self.labels) - 1 - self.labels[1:].count(IGNORE_INDEX))


@dataclass(frozen=True)
class _Piece:
    """A segment, or part of one: an untrained segment before a trained one is cut after its last
    added token, and the part after it (the prompt's tail) is checked against inference."""

    text: str
    trained: bool
    closed: bool = False
    after: str | None = None  # a tail: the added token's text it follows
    prompt_end: bool = False  # a trained span starts after this piece


class _NotExact(Exception):
    """No tokenization of an answer was found that decodes like the whole text (never seen)."""


class SegmentEncoder:
    """Tokenizes rendered rows for one tokenizer. Picklable for ``num_proc``."""

    def __init__(self, tokenizer: Any, max_length: int | None = None, split_rows: bool = True):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.split_rows = split_rows
        self._tails: dict[tuple[str, str], tuple[int, ...]] = {}
        # Whether token counts read from ids (token_bytes) matched offsets (checked once).
        self._bytes_trusted: bool | None = None

    # ---- what the tokenizer is ----------------------------------------------------------------

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
    def _is_fast(self) -> bool:
        return bool(getattr(self.tokenizer, "is_fast", False))

    @cached_property
    def _byte_lengths(self) -> ByteLengths | None:
        """Token counts read from ids, where this tokenizer allows it (built when first needed)."""
        return ByteLengths.of(self.tokenizer) if self._is_fast else None

    @cached_property
    def _last_added(self) -> re.Pattern[str] | None:
        """Matches, in a reversed text, the text of any added token: the first match is the last one."""
        decoder = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        texts = sorted({t.content for t in decoder.values() if t.content}, key=len, reverse=True)
        return re.compile("|".join(re.escape(t[::-1]) for t in texts)) if texts else None

    @cached_property
    def _sentinels(self) -> tuple[str, ...]:
        eos = self.tokenizer.eos_token
        return tuple(dict.fromkeys((eos, *SENTINELS) if eos else SENTINELS))

    # ---- the batch ----------------------------------------------------------------------------

    def encode(self, rows: Sequence[tuple[bool, list[Segment]]]) -> list[list[Tokenized]]:
        """Tokenize rendered rows, given as (is a conversation, segments), in batched calls. Each
        gives one row, or several where its turns cannot share one (see the module docstring)."""
        if not rows:  # a batch whose rows were all invalid; tokenizers fail on an empty batch
            return []
        merged = [_merge_same(segs) for _, segs in rows]
        pieces = [self._pieces(segs) for segs in merged]
        whole: list[tuple[list[int], list[int]] | None] = (
            self._whole(pieces) if self._is_fast else [None] * len(rows)
        )
        prompts = self._prompt_ids(pieces, whole)
        out = []
        for (chat, _), segs, row_pieces, got in zip(rows, merged, pieces, whole):
            built = self._from_whole(row_pieces, chat, *got, prompts) if got is not None else None
            if built is None:
                built = self._exact_or_whole(segs, chat)
            out.append([self._fit(ids, labels, inexact) for ids, labels, inexact in built])
        return out

    def _pieces(self, segs: list[Segment]) -> list[_Piece]:
        """The segments, each untrained one before a trained one cut after its last added token."""
        out: list[_Piece] = []
        for j, (text, trained, closed) in enumerate(segs):
            if trained or j + 1 == len(segs):
                out.append(_Piece(text, trained, closed))
                continue
            found = self._last_added_in(text)
            if found is None:  # the whole prompt is checked (raw pairs, templates without added tokens)
                out.append(_Piece(text, False, prompt_end=True))
                continue
            cut = len(text) - found.start()
            if cut == len(text):  # the span starts right after an added token: nothing to check
                out.append(_Piece(text, False))
                continue
            out.append(_Piece(text[:cut], False))
            out.append(_Piece(text[cut:], False, after=found.group()[::-1], prompt_end=True))
        return out

    def _last_added_in(self, text: str) -> re.Match[str] | None:
        """The last added token of ``text``, matched in the reversed text: searched in its last 512
        characters first (a prompt's last added token opens its assistant header), then in all of it."""
        if self._last_added is None:
            return None
        if len(text) > LAST_ADDED_WINDOW:
            found = self._last_added.search(text[-LAST_ADDED_WINDOW:][::-1])
            # A match ending at the window's start may be part of a longer token: search it all.
            if found is not None and found.end() < LAST_ADDED_WINDOW:
                return found
        return self._last_added.search(text[::-1])

    def _whole(self, pieces: list[list[_Piece]]) -> list[tuple[list[int], list[int]] | None]:
        """Each row's ids tokenized whole and its pieces' token counts, or None where a token crosses
        a boundary between pieces. Read from the ids (``token_bytes``) where the tokenizer allows,
        else from offsets; the first rows of the first batch are read both ways, and where any
        differs this encoder uses offsets for good."""
        texts = ["".join(p.text for p in row) for row in pieces]
        splits = [[p.text for p in row] for row in pieces]
        found = self._counts_from_bytes(texts, splits)
        missing = [k for k, got in enumerate(found) if got is False]
        if missing:
            by_offsets = self._counts_from_offsets([texts[k] for k in missing], [splits[k] for k in missing])
            for k, got in zip(missing, by_offsets):
                found[k] = got
        return found  # type: ignore[return-value]

    def _counts_from_offsets(
        self, texts: list[str], splits: list[list[str]]
    ) -> list[tuple[list[int], list[int]] | None]:
        enc = self.tokenizer(
            texts,
            add_special_tokens=False,
            return_attention_mask=False,  # not used: converting it to lists costs a quarter of the call
            return_token_type_ids=False,
        )
        out = []
        for k, split in enumerate(splits):
            ids = enc["input_ids"][k]
            counts = _piece_token_counts(enc.encodings[k], split, len(ids))
            out.append((ids, counts) if counts is not None else None)
        return out

    def _counts_from_bytes(
        self, texts: list[str], splits: list[list[str]]
    ) -> list[tuple[list[int], list[int]] | bool | None]:
        """``_counts_from_offsets`` read from the ids; False for each row left to offsets."""
        lengths = self._byte_lengths
        if lengths is None or self._bytes_trusted is False:
            return [False] * len(texts)
        ids = lengths.encode(texts)
        if ids is None:
            return [False] * len(texts)
        found: list[Any] = [
            (row, counts) if (counts := lengths.counts(text, row, split)) else False
            for text, row, split in zip(texts, ids, splits)
        ]
        if self._bytes_trusted is None:
            n = BYTES_CHECKED_ROWS
            reference = self._counts_from_offsets(texts[:n], splits[:n])
            self._bytes_trusted = any(found[:n]) and all(
                f is False or f == r for f, r in zip(found, reference)
            )
            if not self._bytes_trusted:
                logger.debug("Reading token counts from offsets: reading them from the ids gave others")
                return [*reference, *([False] * len(found[n:]))]
            return [*reference, *found[n:]]
        return found

    def _prompt_ids(
        self, pieces: list[list[_Piece]], whole: list[tuple[list[int], list[int]] | None]
    ) -> dict[Any, tuple[int, ...]]:
        """The ids inference gives each prompt end found in the batch (tails behind their added token,
        cached; prompts with no added token, tokenized whole), in one batched call."""
        tails: dict[Any, str] = {}
        for row, got in zip(pieces, whole):
            if got is None:
                continue
            text = ""
            for piece in row:
                text += piece.text
                if not piece.prompt_end:
                    continue
                if piece.after is None:
                    tails[text] = text
                elif (piece.after, piece.text) not in self._tails:
                    tails[piece.after, piece.text] = piece.after + piece.text
        out: dict[Any, tuple[int, ...]] = {}
        if tails:
            keys = list(tails)
            encoded = self._ids_batch([tails[k] for k in keys])
            after = {k[0] for k in keys if isinstance(k, tuple)}
            lead = dict(zip(after, self._ids_batch(list(after)))) if after else {}
            for key, ids in zip(keys, encoded):
                if isinstance(key, tuple):
                    n = len(lead[key[0]])
                    # an added token that also took text with it tokenizes differently: never matches
                    value = tuple(ids[n:]) if ids[:n] == lead[key[0]] else (-1,)
                    if len(key[1]) <= CACHED_TAIL_CHARS and len(self._tails) < CACHED_TAILS:
                        self._tails[key] = value
                    out[key] = value
                else:
                    out[key] = tuple(ids)
        return out

    def _from_whole(
        self,
        pieces: list[_Piece],
        chat: bool,
        ids: list[int],
        counts: list[int],
        prompts: dict[Any, tuple[int, ...]],
    ) -> list[tuple[list[int], list[int], bool]] | None:
        """The row from its whole-text ids, or None where they differ from inference: a prompt whose
        tokens are not the prompt's own, or EOS to add after a turn that another turn follows."""
        labels: list[int] = []
        pos = last = 0
        texts: list[str] = []  # the pieces so far, joined only for a prompt checked whole
        open_turn = False
        for piece, n in zip(pieces, counts):
            texts.append(piece.text)
            if piece.prompt_end:
                if piece.after is None:
                    want, got = prompts["".join(texts)], ids[: pos + n]
                else:
                    key = (piece.after, piece.text)
                    want, got = prompts[key] if key in prompts else self._tails[key], ids[pos : pos + n]
                if tuple(got) != want:
                    return None
            span = ids[pos : pos + n]
            pos += n
            if not piece.trained or not span:
                labels += [IGNORE_INDEX] * n
                continue
            if open_turn:  # the turn before needs EOS, which the next prompt does not have
                return None
            labels += span
            last = pos
            open_turn = chat and not piece.closed
        if not last:
            return [(ids, labels, False)]
        return [self._closed(ids, labels, chat, not open_turn, last - 1)]

    def _closed(
        self, ids: list[int], labels: list[int], chat: bool, turn_closed: bool, last: int
    ) -> tuple[list[int], list[int], bool]:
        """EOS after the last trained token (at ``last``) where nothing closes it: a conversation's
        turn its template does not close; text and pairs, which end with EOS."""
        if (chat and turn_closed) or (not chat and ids[-1] == self.eos_id):
            return ids, labels, False
        at = last + 1 if chat else len(ids)
        return [*ids[:at], self.eos_id, *ids[at:]], [*labels[:at], self.eos_id, *labels[at:]], False

    # ---- turn by turn -------------------------------------------------------------------------

    def _exact_or_whole(self, segs: list[Segment], chat: bool) -> list[tuple[list[int], list[int], bool]]:
        try:
            return self._exact(segs, chat)
        except _NotExact:
            # Never seen with the tokenizers tested; the row is still trained, tokenized whole.
            logger.debug("No exact tokenization for a row; tokenizing its segments one after another")
            return [(*self._segmentwise(segs, chat), True)]

    def _exact(self, segs: list[Segment], chat: bool) -> list[tuple[list[int], list[int], bool]]:
        """The row built turn by turn: each prompt tokenized alone, each answer as its continuation."""
        text = "".join(seg.text for seg in segs)
        spans, pos = [], 0
        for piece, trained, closed in segs:
            if trained:
                spans.append((pos, pos + len(piece), closed))
            pos += len(piece)
        if not spans:
            untrained = self._ids(text)
            return [(untrained, [IGNORE_INDEX] * len(untrained), False)]
        rows: list[tuple[list[int], list[int], bool]] = []
        ids: list[int] = []
        labels: list[int] = []
        core: list[int] = []  # text[:covered] tokenized as inference would (no EOS added, no split)
        covered = 0
        inexact = False
        for s, e, closed in spans:
            prompt = inference = self._ids(text[:s])
            answer = self._continuation(inference, text[:s], text[s:e])
            if ids and prompt[: len(ids)] != ids:
                if self.split_rows:
                    rows.append((ids, labels, inexact))
                    ids, labels = [], []
                else:  # one row: its context continues what was trained, and differs from inference
                    prompt, inexact = ids + self._continuation(core, text[:covered], text[covered:s]), True
            core, covered = inference + answer, e
            labels += [IGNORE_INDEX] * (len(prompt) - len(ids))
            ids = list(prompt)
            ids += answer
            labels += answer
            if chat and not closed:
                ids.append(self.eos_id)
                labels.append(self.eos_id)
        rest = self._continuation(core, text[:covered], text[covered:])
        ids += rest
        labels += [IGNORE_INDEX] * len(rest)
        if not chat and ids[-1] != self.eos_id:
            ids.append(self.eos_id)
            labels.append(self.eos_id)
        rows.append((ids, labels, inexact))
        return rows

    def _continuation(self, prompt: list[int], before: str, text: str) -> list[int]:
        """Ids for ``text`` following ``prompt`` (the ids of the text ``before``) that decode, after
        it, as the two texts tokenized whole decode: the whole text's own tokens after the prompt
        where it starts with the prompt's ids; else its tokens from the first token that starts on a
        boundary at or after the prompt's end, with the text before that (crossed by a token of the
        whole text) tokenized on its own."""
        if not text:
            return []
        whole, offsets = self._ids_offsets(before + text)
        if whole[: len(prompt)] == prompt:
            return whole[len(prompt) :]
        want = self._decode(whole)
        t = _first_clean(offsets, len(before)) if offsets is not None else None
        if t is not None and offsets is not None:  # t is found only in offsets
            gap = text[: offsets[t][0] - len(before)] if t < len(whole) else text
            for head in self._alone(gap) if gap else [[]]:
                answer = head + whole[t:]
                if self._decode(prompt + answer) == want:
                    return answer
        for answer in self._alone(text):
            if self._decode(prompt + answer) == want:
                return answer
        raise _NotExact

    def _alone(self, text: str) -> Iterator[list[int]]:
        """Tokenizations of ``text`` as a continuation (no prefix space): tokenized behind a sentinel
        that ends on a token boundary, the sentinel's tokens dropped. The caller checks each."""
        for sentinel in self._sentinels:
            ids, offsets = self._ids_offsets(sentinel + text)
            if offsets is not None:
                t = _first_clean(offsets, len(sentinel))
                if t is not None and t < len(ids) and offsets[t][0] == len(sentinel):
                    yield ids[t:]
            else:
                lead = self._ids(sentinel)
                if ids[: len(lead)] == lead:
                    yield ids[len(lead) :]

    def _segmentwise(self, segs: list[Segment], chat: bool) -> tuple[list[int], list[int]]:
        """Segments tokenized one after another, each behind EOS (dropped): the last resort."""
        ids: list[int] = []
        labels: list[int] = []
        eos = self.tokenizer.eos_token or ""
        for k, (text, trained, _) in enumerate(segs):
            piece = self._ids(text) if k == 0 else self._ids(eos + text)[len(self._ids(eos)) :]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        trained_at = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
        if trained_at:
            closed = next(seg.closed for seg in reversed(segs) if seg.trained)
            ids, labels, _ = self._closed(ids, labels, chat, closed, trained_at[-1])
        return ids, labels

    # ---- tokenizer calls ----------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _ids_batch(self, texts: list[str]) -> list[list[int]]:
        fast = self._byte_lengths.encode(texts) if self._byte_lengths is not None else None
        if fast is not None:  # the backend's own batch call, without the wrapper's conversions
            return fast
        return self.tokenizer(
            texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False
        )["input_ids"]

    def _ids_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
        if not self._is_fast:
            return self._ids(text), None
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _fit(self, ids: list[int], labels: list[int], inexact: bool) -> Tokenized:
        """BOS once at the start (where the tokenizer adds one), then truncation to max_length."""
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, labels = [self.bos_id, *ids], [IGNORE_INDEX, *labels]
        truncated = self.max_length is not None and len(ids) > self.max_length
        if truncated:
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return Tokenized(ids, labels, truncated, inexact)


def _first_clean(offsets: list[tuple[int, int]], at: int) -> int | None:
    """The first token that starts at or after character ``at`` where the token before it ends (a
    token boundary, not inside a token); ``len(offsets)`` when none does, None for no tokens."""
    if not offsets:
        return None
    for t, (start, _) in enumerate(offsets):
        if start >= at and (t == 0 or offsets[t - 1][1] <= start):
            return t
    return len(offsets)


def _piece_token_counts(encoding: Any, pieces: list[str], n_tokens: int) -> list[int] | None:
    """Tokens per piece of a text tokenized whole, or None when a token crosses a boundary.

    A boundary is clean when a token starts exactly there and the token before it ends exactly
    there. Checking both sides also catches tokenizers that trim offsets (a token " Paris" reported
    as starting at "P" while it really swallowed the prompt's trailing space).
    """
    counts, pos, previous = [], 0, 0
    for text in pieces[:-1]:
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


def _merge_same(segments: list[Segment]) -> list[Segment]:
    """Consecutive segments of one kind joined (a trained run is closed as its last part is)."""
    if all(seg[0] for seg in segments) and all(a[1] != b[1] for a, b in itertools.pairwise(segments)):
        return [seg if isinstance(seg, Segment) else Segment(*seg) for seg in segments]
    merged: list[Segment] = []
    for seg in segments:
        seg = Segment(*seg)
        if not seg.text:
            continue
        if merged and merged[-1].trained == seg.trained:
            merged[-1] = Segment(merged[-1].text + seg.text, seg.trained, seg.closed)
        else:
            merged.append(seg)
    return merged
