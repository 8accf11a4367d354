"""Examples -> ``input_ids`` + ``labels`` with the loss exactly on the trained tokens.

An example is first rendered into *segments*, consecutive pieces of text each trained or not
(``sftrainer.data.turns``: where each assistant turn lies in the template's rendering, rendered by
``sftrainer.data.render``). The segments are then tokenized by ``encode.SegmentEncoder``: the ids before
every trained span are the ids inference gives that prompt, and each trained span decodes to exactly its
text; a turn the template does not close with a token gets EOS. Rows that already hold ``input_ids`` get
their labels from TRL's mask columns (``tokenize_pretokenized``).

Output rows (``ExampleTokenizer.tokenize``): ``input_ids`` list[int], ``labels`` list[int] with
``IGNORE_INDEX`` on every untrained token. ``labels`` are aligned with ``input_ids`` (not shifted).

``RowEncoder`` is the protocol ``data.prepare.prepare`` tokenizes with (render, then encode a batch):
``ExampleTokenizer`` implements it for text, ``sftrainer.vision.encode.VisionTokenizer`` for rows with
images (its ``images``, a ``RowImages``, finds and reads them); the pipeline picks which.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from sftrainer.constants import IGNORE_INDEX, LOSS_MASK_COLUMNS
from sftrainer.data.encode import Segment, SegmentEncoder, Tokenized
from sftrainer.data.formats import ChatExample, Example
from sftrainer.data.turns import TurnLocator
from sftrainer.errors import RowError

D = TypeVar("D")


class RowImages(Protocol):
    """The images of rows, for an encoder that reads them: opaque to ``data/`` (``ImageRef`` in
    ``sftrainer.vision.images``); ``prepare`` carries them in an ``images`` column."""

    def readable(self, dataset: D) -> D:
        """The data set with its image column (if any) read as this encoder reads it."""
        ...

    def split(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """The row without its images (each image's place marked in its text), and its images.
        Raises ``RowError`` for an image that cannot be used."""
        ...

    def held_by(self, example: Example, images: list[Any]) -> list[Any]:
        """The images of ``images`` that ``example`` holds (a ``split_turns`` part holds the first ones)."""
        ...


class RowEncoder(Protocol):
    """What ``data.prepare.prepare`` tokenizes with. Picklable (``num_proc``).

    ``render`` gives an example's segments and how many trained turns the template renders differently
    (``RowError`` for a row it cannot render); ``encode`` tokenizes a batch of rendered examples (with
    the images each holds, where ``images`` is not None) and gives per example its rows, the
    ``RowError`` of an example it cannot use, or None for one dropped because ``max_length`` would
    cut through an image's tokens.
    """

    tokenizer: Any  # the text tokenizer: its EOS and chat template are checked up front
    max_length: int | None  # pre-tokenized rows are cut to it

    @property
    def images(self) -> RowImages | None: ...  # None: the rows' images are not read (a text encoder)

    @property
    def untrained_empty_reasoning(self) -> int: ...  # a running count (``TurnLocator``)

    def render(self, example: Example, images: Sequence[Any] = ()) -> tuple[list[Segment], int]: ...

    def encode(
        self, rows: Sequence[tuple[Example, list[Segment]]], images: Sequence[Sequence[Any]] | None = None
    ) -> Sequence[list[Tokenized] | RowError | None]: ...


class ExampleTokenizer(TurnLocator):
    """Tokenizes examples for one tokenizer and one set of settings. Picklable for ``num_proc``.
    The text ``RowEncoder``: it reads no images."""

    images: RowImages | None = None

    def __init__(
        self,
        tokenizer: Any,
        max_length: int | None = None,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
        split_rows: bool = True,
        train_empty_reasoning: bool = False,
    ):
        super().__init__(tokenizer, train_on, template_kwargs, train_empty_reasoning)
        self.max_length = max_length
        self.encoder = SegmentEncoder(tokenizer, max_length, split_rows)

    @property
    def bos_id(self) -> int | None:
        """The BOS id if this tokenizer adds one to plain text (Llama, Gemma), else None (Qwen, GPT-2)."""
        return self.encoder.bos_id

    def tokenize(self, examples: Sequence[Example]) -> list[Tokenized]:
        """Tokenize a batch: its rows, in order (an example whose turns cannot share a row gives
        more than one). Raises ``RowError`` for a row the chat template cannot render."""
        encoded = self.encode([(ex, self.segments(ex)) for ex in examples])
        return [row for rows in encoded for row in rows]

    def render(self, example: Example, images: Sequence[Any] = ()) -> tuple[list[Segment], int]:
        """``TurnLocator.render``; ``images`` is the protocol's, always empty for text (``images`` is None)."""
        return super().render(example)

    def encode(
        self, rows: Sequence[tuple[Example, list[Segment]]], images: Sequence[Sequence[Any]] | None = None
    ) -> list[list[Tokenized]]:
        """Tokenize already rendered rows in batched tokenizer calls; per row, its output rows
        (``images``: the protocol's, unused for text)."""
        return self.encoder.encode([(isinstance(ex, ChatExample), segs) for ex, segs in rows])


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
