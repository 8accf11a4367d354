"""Vision-language rows -> tokens: a conversation rendered with its images' tokens, the loss exactly on
the assistant text, never on an image token. ``VisionTokenizer`` is the image strategy's encoder: a
``data.tokenize.RowEncoder`` (``data.prepare.prepare`` runs it over a data set, as the text encoder),
which renders and encodes as the text pipeline's ``ExampleTokenizer`` does (it wraps one), with the
images' expansions put in between; its ``images`` (``ImageReader``) find and read the rows' images.

One row goes through the text pipeline's own steps, with the images put in between:

1. ``images.split_images``: the row's images (``ImageRef``) and its text with a sentinel where each
   goes; ``formats.normalise_row`` reads roles, system, tools as for any row; ``images.with_parts``
   gives the messages typed parts, ``{"type": "image"}`` at each sentinel.
2. ``ExampleTokenizer.render`` (the text pipeline's): the chat template renders the conversation,
   each image as the processor's placeholder (``<image>``, ``<start_of_image>``), and every trained
   assistant turn is located in it as for text.
3. The processor says what each placeholder expands to for its image (``return_text_replacement_offsets``:
   576 ``<image>`` tokens, tiles with row / column tokens, ...); the placeholders are replaced by
   that text and ``ExampleTokenizer.encode`` tokenizes the whole text as the processor would, so the
   ids are the processor's. Then every image token (the expansion's special tokens) gets
   ``IGNORE_INDEX``, the number of image tokens is checked against what the processor expects, and a
   row that ``max_length`` would cut inside an image is refused (None: the model would get fewer image
   tokens than image features).

Truncation is done here (``_fit``, never inside an image, for keep_start and keep_end alike), and an
example gives one row (``split_rows`` off: a row's images cannot follow it into a second row; a later
prompt that differs from inference is counted as ``inexact``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from datasets import Dataset, Image, IterableDataset

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.formats import ChatExample, Example
from sftrainer.data.prepare import DataSettings
from sftrainer.data.tokenize import ExampleTokenizer, Segment, Tokenized
from sftrainer.errors import ConfigError, RowError
from sftrainer.vision.images import ImageRef, count_images, image_column, load_image, split_images, with_parts
from sftrainer.vision.processor import feature_token_ids, placeholder

D = TypeVar("D", Dataset, IterableDataset)


class ImageReader:
    """The ``data.tokenize.RowImages`` of vision rows: the image column ('images' or 'image') read
    undecoded, each row's images split from its text (relative paths read from ``image_root``)."""

    def __init__(self, image_root: str | None = None):
        self.image_root = image_root

    def readable(self, dataset: D) -> D:
        """The data set with its image column read as stored ({"bytes", "path"}), not decoded by
        datasets: the rows' images are decoded in ``VisionTokenizer.encode``, with errors naming the row."""
        column = image_column(list(dataset.column_names or []))
        feature = (dataset.features or {}).get(column) if column else None
        if column is None or feature is None:
            return dataset
        new = _undecoded(feature)
        return dataset if new == feature else dataset.cast_column(column, new)

    def split(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[ImageRef]]:
        return split_images(row, image_column(list(row)), self.image_root)

    def held_by(self, example: Example, images: list[ImageRef]) -> list[ImageRef]:
        return images[: count_images(example)]


def _undecoded(feature: Any) -> Any:
    if isinstance(feature, Image):
        return Image(decode=False)
    if hasattr(feature, "feature"):
        feature = copy.copy(feature)
        feature.feature = _undecoded(feature.feature)
    return feature


class VisionTokenizer:
    """Tokenizes vision-language examples for one processor and settings; picklable (``num_proc``).
    A ``data.tokenize.RowEncoder``."""

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
        truncation_mode: str = "keep_start",
        train_empty_reasoning: bool = False,
        image_root: str | None = None,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Truncation is done here (never inside an image), so the text tokenizer keeps whole rows.
        # One row per example: a row's images cannot follow it into a second row (encode.py).
        self.text = ExampleTokenizer(
            self.tokenizer, None, train_on, template_kwargs, False, train_empty_reasoning
        )
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.placeholder = placeholder(processor)
        self.feature_ids = feature_token_ids(processor)
        self._expansions: dict[str, tuple[frozenset[int], int]] = {}
        self.images = ImageReader(image_root)

    @classmethod
    def for_settings(
        cls, processor: Any, settings: DataSettings, image_root: str | None = None
    ) -> VisionTokenizer:
        """The encoder ``data.prepare.prepare`` uses for a processor and ``settings``."""
        return cls(
            processor,
            settings.max_length,
            settings.train_on,
            dict(settings.chat_template_kwargs),
            settings.truncation_mode,
            settings.train_empty_reasoning,
            image_root,
        )

    @property
    def untrained_empty_reasoning(self) -> int:
        return self.text.untrained_empty_reasoning

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids) | frozenset(self.tokenizer.added_tokens_decoder)

    def render(self, example: Example, images: Sequence[Any] = ()) -> tuple[list[Segment], int]:
        """Segments (as ``ExampleTokenizer.render``) of an example holding ``images`` (one per image place)."""
        n_images = len(images)
        if isinstance(example, ChatExample):
            example = with_parts(example)
        elif n_images:
            raise RowError(
                "images",
                "images go into a conversation rendered by the chat template, and this row is rendered as "
                "raw text: give it as messages (or set pair_template='chat' for prompt/completion rows)",
            )
        segments, rewritten = self.text.render(example)
        found = sum(seg.text.count(self.placeholder) for seg in segments)
        if found != n_images:
            why = (
                "the template does not render image parts (use the processor's chat template)"
                if found < n_images
                else f"the text itself contains {self.placeholder!r}"
            )
            raise RowError(
                "messages",
                f"the chat template renders {found} image placeholder(s) {self.placeholder!r} for the row's "
                f"{n_images} image(s): {why}",
            )
        return segments, rewritten

    def expansions(self, images: Sequence[Sequence[Any]]) -> list[list[str]]:
        """For each row's PIL images, the text each image's placeholder expands to (the processor's)."""
        rows = [k for k, row in enumerate(images) if row]
        out: list[list[str]] = [[] for _ in images]
        if not rows:
            return out
        result = self.processor(
            text=[self.placeholder * len(images[k]) for k in rows],
            images=[list(images[k]) for k in rows],
            return_text_replacement_offsets=True,
            add_special_tokens=False,
        )
        offsets = result.get("text_replacement_offsets")
        if offsets is None:
            raise ConfigError(
                f"{type(self.processor).__name__} does not report how it expands image placeholders "
                "(return_text_replacement_offsets, transformers >= 5.x processors); it cannot be used here"
            )
        for k, found in zip(rows, offsets):
            out[k] = [item["replacement"] for item in found if item.get("type") == "image"]
        return out

    def expansion_ids(self, text: str) -> tuple[frozenset[int], int]:
        """(the special tokens of an image's expansion, how many image-feature tokens it holds)."""
        if text not in self._expansions:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            specials = frozenset(i for i in ids if i in self.special_ids or i in self.feature_ids)
            self._expansions[text] = (specials, sum(i in self.feature_ids for i in ids))
        return self._expansions[text]

    def encode(
        self, rows: Sequence[tuple[Example, list[Segment]]], images: Sequence[Sequence[Any]] | None = None
    ) -> list[list[Tokenized] | RowError | None]:
        """Tokenize rendered rows with their images (``ImageRef``, read here). Per row: its one row of
        tokens, None when ``max_length`` would cut inside an image, or the ``RowError`` of a row whose
        images cannot be read, the processor rejects, or whose image tokens the tokenizer did not keep
        apart."""
        given = images if images is not None else [[] for _ in rows]
        results: list[list[Tokenized] | RowError | None] = [None] * len(rows)
        loaded: dict[int, list[Any]] = {}
        for k, refs in enumerate(given):
            try:
                loaded[k] = [load_image(ref, _where(ref, j)) for j, ref in enumerate(refs)]
            except RowError as err:
                results[k] = err
        ready: list[tuple[int, list[str]]] = []
        for k, reps in zip(loaded, self._replacements(list(loaded.values()))):
            if isinstance(reps, RowError):
                results[k] = reps
            else:
                ready.append((k, reps))
        encoded = self._encode([(*rows[k], reps) for k, reps in ready])
        for (k, _), result in zip(ready, encoded):
            results[k] = [result] if isinstance(result, Tokenized) else result
        return results

    def _replacements(self, images: list[list[Any]]) -> list[list[str] | RowError]:
        """The processor's expansions for the rows' images; if it fails, row by row, so that only the
        rows whose images it rejects are reported."""
        try:
            return list(self.expansions(images))
        except (ValueError, TypeError, OSError) as err:
            if len(images) == 1:
                return [RowError("images", f"the image processor rejects this row's images ({err})")]
        return [self._replacements([row])[0] for row in images]

    def _encode(
        self, rows: Sequence[tuple[Example, list[Segment], list[str]]]
    ) -> list[Tokenized | RowError | None]:
        """Tokenize rendered rows with their images' expansions. Per row: the tokens, None when
        ``max_length`` would cut inside an image, or the ``RowError`` of a row whose image tokens the
        tokenizer did not keep apart."""
        expanded = [(example, _expand(segments, self.placeholder, reps)) for example, segments, reps in rows]
        out: list[Tokenized | RowError | None] = []
        for (_, _, reps), [tokenized] in zip(rows, self.text.encode(expanded)):
            image_ids: set[int] = set()
            want = 0
            for rep in reps:
                specials, features = self.expansion_ids(rep)
                image_ids |= specials
                want += features
            ids = tokenized.input_ids
            got = sum(i in self.feature_ids for i in ids)
            if got != want:
                out.append(
                    RowError(
                        "messages",
                        f"the row tokenizes to {got} image tokens where its images need {want} (does its "
                        "text contain the image token itself?)",
                    )
                )
                continue
            labels = [IGNORE_INDEX if i in image_ids else label for i, label in zip(ids, tokenized.labels)]
            out.append(self._fit(ids, labels, image_ids, tokenized.inexact))
        return out

    def _fit(self, ids: list[int], labels: list[int], image_ids: set[int], inexact: bool) -> Tokenized | None:
        """Truncate to max_length, or None when the cut would fall inside (or before) an image."""
        n = self.max_length
        if n is None or len(ids) <= n:
            return Tokenized(ids, labels, False, inexact)
        at = [k for k, i in enumerate(ids) if i in image_ids]
        if self.truncation_mode == "keep_end":
            start = len(ids) - n
            return None if at and at[0] < start else Tokenized(ids[start:], labels[start:], True, inexact)
        return None if at and at[-1] >= n else Tokenized(ids[:n], labels[:n], True, inexact)


def _where(ref: ImageRef, k: int) -> str:
    return f"images[{k}]" + (f" ({ref['path']})" if ref.get("path") else "")


def _expand(segments: list[Segment], placeholder: str, replacements: list[str]) -> list[Segment]:
    """Segments with the k-th placeholder replaced by the k-th image's expansion."""
    reps = iter(replacements)
    return [seg._replace(text=expand_placeholders(seg.text, placeholder, reps)) for seg in segments]


def expand_placeholders(text: str, placeholder: str, replacements: Any) -> str:
    """``text`` with each ``placeholder`` replaced by the next of ``replacements`` (an iterable)."""
    reps = iter(replacements)
    pieces = text.split(placeholder)
    return pieces[0] + "".join(next(reps) + piece for piece in pieces[1:])
