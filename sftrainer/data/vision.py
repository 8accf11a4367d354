"""Vision-language rows -> ``input_ids`` + ``labels`` + ``images``, the loss exactly on the
assistant text, never on an image token.

One row goes through the text pipeline's own steps, with the images put in between:

1. ``images.split_images``: the row's images (``ImageRef``) and its text with a sentinel where each
   goes; ``formats.normalise_row`` reads roles, system, tools as for any row; ``images.with_parts``
   gives the messages typed parts, ``{"type": "image"}`` at each sentinel.
2. ``ExampleTokenizer.render`` (the text pipeline's): the chat template renders the conversation,
   each image as the processor's placeholder (``<image>``, ``<start_of_image>``), and every trained
   assistant turn is located in it as for text.
3. The processor says what each placeholder expands to for its image (``return_text_replacement_offsets``:
   576 ``<image>`` tokens, tiles with row / column tokens, ...); the placeholders are replaced by
   that text in the untrained segments and ``ExampleTokenizer.encode`` tokenizes the whole text as
   the processor would, so the ids are the processor's. Then every image token (the expansion's
   special tokens) gets ``IGNORE_INDEX``, the number of image tokens is checked against what the
   processor expects, and a row that ``max_length`` would cut inside an image is dropped and
   counted (the model would get fewer image tokens than image features).

Output rows (``prepare_vision``): ``input_ids`` list[int], ``labels`` list[int] (``IGNORE_INDEX`` on
every untrained and every image token), ``images`` list of ``{"bytes", "path"}`` (decoded by
``vision_collate.VisionCollator``, which makes the pixel tensors batch by batch).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, IterableDataset

from sftrainer.constants import IGNORE_INDEX, IMAGE_COLUMNS
from sftrainer.data.formats import (
    ChatExample,
    Format,
    detect_format,
    implied_columns,
    normalise_row,
    pairs_as_chat,
    rename_columns,
    split_turns,
)
from sftrainer.data.images import ImageRef, count_images, image_column, load_image, split_images, with_parts
from sftrainer.data.load import guard_stream
from sftrainer.data.prepare import EMPTY, MAX_LISTED_PROBLEMS, OK, TRUNCATED, DataSettings, PrepareStats
from sftrainer.data.tokenize import ExampleTokenizer, Segment, Tokenized
from sftrainer.errors import ConfigError, DataError, RowError

logger = logging.getLogger(__name__)

IMAGE_CUT = "image_cut"  # an "_issue": max_length would cut through an image's tokens


@dataclass
class VisionPrepareStats(PrepareStats):
    images: int = 0  # images in the kept rows
    dropped_image_cut: int = 0  # rows max_length would cut inside an image

    def summary(self, max_length: int | None) -> str:
        text = super().summary(max_length) + f", {self.images} images"
        if self.dropped_image_cut:
            text += (
                f", {self.dropped_image_cut} dropped: max_length={max_length} would cut through an image's "
                "tokens (raise max_length)"
            )
        return text


def placeholder(processor: Any) -> str:
    """The text the processor expands into an image's tokens (``<image>``, Gemma 3's ``<start_of_image>``)."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token:
        raise ConfigError(
            f"{type(processor).__name__} has no image_token: sftrainer cannot tell where its images go"
        )
    return token


def feature_token_ids(processor: Any) -> frozenset[int]:
    """Ids of the tokens the model replaces by image features (repeated once per feature)."""
    ids = {i for i in getattr(processor, "image_token_ids", None) or [] if isinstance(i, int)}
    if not ids:
        ids = {processor.tokenizer.convert_tokens_to_ids(placeholder(processor))}
    return frozenset(ids)


class VisionTokenizer:
    """Tokenizes vision-language examples for one processor and settings; picklable (``num_proc``)."""

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        train_on: str = "response",
        template_kwargs: dict[str, Any] | None = None,
        truncation_mode: str = "keep_start",
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Truncation is done here (never inside an image), so the text tokenizer keeps whole rows.
        self.text = ExampleTokenizer(self.tokenizer, None, train_on, template_kwargs)
        self.max_length = max_length
        self.truncation_mode = truncation_mode
        self.placeholder = placeholder(processor)
        self.feature_ids = feature_token_ids(processor)
        self._expansions: dict[str, tuple[frozenset[int], int]] = {}

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids) | frozenset(self.tokenizer.added_tokens_decoder)

    def render(self, example: Any, n_images: int) -> tuple[list[Segment], int]:
        """Segments (as ``ExampleTokenizer.render``) of an example holding ``n_images`` image places."""
        if isinstance(example, ChatExample):
            example = with_parts(example)
        elif n_images:
            raise RowError(
                "images",
                "images go into a conversation rendered by the chat template, and this row is rendered as "
                "raw text: give it as messages (or set pair_template='chat' for prompt/completion rows)",
            )
        segments, rewritten = self.text.render(example)
        found = sum(text.count(self.placeholder) for text, _ in segments)
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
        self, rows: Sequence[tuple[Any, list[Segment], list[str]]]
    ) -> list[Tokenized | RowError | None]:
        """Tokenize rendered rows with their images' expansions. Per row: the tokens, None when
        ``max_length`` would cut inside an image, or the ``RowError`` of a row whose image tokens the
        tokenizer did not keep apart."""
        expanded = [(example, _expand(segments, self.placeholder, reps)) for example, segments, reps in rows]
        out: list[Tokenized | RowError | None] = []
        for (_, _, reps), tokenized in zip(rows, self.text.encode(expanded)):
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
            out.append(self._fit(ids, labels, image_ids))
        return out

    def _fit(self, ids: list[int], labels: list[int], image_ids: set[int]) -> Tokenized | None:
        """Truncate to max_length, or None when the cut would fall inside (or before) an image."""
        n = self.max_length
        if n is None or len(ids) <= n:
            return Tokenized(ids, labels, False)
        at = [k for k, i in enumerate(ids) if i in image_ids]
        if self.truncation_mode == "keep_end":
            start = len(ids) - n
            return None if at and at[0] < start else Tokenized(ids[start:], labels[start:], True)
        return None if at and at[-1] >= n else Tokenized(ids[:n], labels[:n], True)


def _expand(segments: list[Segment], placeholder: str, replacements: list[str]) -> list[Segment]:
    """Segments with the k-th placeholder replaced by the k-th image's expansion."""
    reps = iter(replacements)
    return [(expand_placeholders(text, placeholder, reps), trained) for text, trained in segments]


def expand_placeholders(text: str, placeholder: str, replacements: Any) -> str:
    """``text`` with each ``placeholder`` replaced by the next of ``replacements`` (an iterable)."""
    reps = iter(replacements)
    pieces = text.split(placeholder)
    return pieces[0] + "".join(next(reps) + piece for piece in pieces[1:])


class _VisionBatch:
    """The function given to ``Dataset.map``: raw rows -> token rows, their images, an issue per row."""

    def __init__(
        self,
        encoder: VisionTokenizer,
        fmt: Format | None,
        settings: DataSettings,
        formatting_func: Callable[[dict[str, Any]], Any] | None,
        column: str | None,
        image_root: str | None,
    ):
        self.encoder = encoder
        self.fmt = fmt
        self.settings = settings
        self.formatting_func = formatting_func
        self.column = column
        self.image_root = image_root

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        keys = list(batch)
        out: dict[str, list[Any]] = {k: [] for k in ("input_ids", "labels", "images", "_issue", "_rewritten")}
        pending: list[tuple[int, int, Any, list[Segment], list[Any]]] = []  # slot, row, example, ...
        for values, index in zip(zip(*batch.values()), indices):
            try:
                rendered = []
                for example, refs in self._examples(dict(zip(keys, values))):
                    segments, rewritten = self.encoder.render(example, len(refs))
                    loaded = [load_image(ref, _where(ref, k)) for k, ref in enumerate(refs)]
                    rendered.append((example, segments, rewritten, refs, loaded))
            except RowError as err:
                self._put(out, [], f"row {index + 1}: {err}", 0)
                continue
            for example, segments, rewritten, refs, loaded in rendered:
                pending.append((self._put(out, refs, OK, rewritten), index, example, segments, loaded))
        expansions = self._expansions([p[4] for p in pending])
        ready = []
        for item, reps in zip(pending, expansions):
            if isinstance(reps, RowError):
                out["_issue"][item[0]] = f"row {item[1] + 1}: {reps}"
            else:
                ready.append((item, reps))
        encoded = self.encoder.encode([(item[2], item[3], reps) for item, reps in ready])
        for ((slot, index, *_), _), result in zip(ready, encoded):
            if isinstance(result, RowError):
                out["_issue"][slot] = f"row {index + 1}: {result}"
            elif result is None:
                out["_issue"][slot] = IMAGE_CUT
            else:
                out["input_ids"][slot], out["labels"][slot] = result.input_ids, result.labels
                out["_issue"][slot] = (
                    EMPTY if result.n_trained == 0 else TRUNCATED if result.truncated else OK
                )
        return out

    def _expansions(self, images: list[list[Any]]) -> list[list[str] | RowError]:
        """The processor's expansions for the batch; if it fails, row by row, so that only the rows
        whose images it rejects are reported."""
        try:
            return list(self.encoder.expansions(images))
        except (ValueError, TypeError, OSError) as err:
            if len(images) == 1:
                return [RowError("images", f"the image processor rejects this row's images ({err})")]
        return [self._expansions([row])[0] for row in images]

    def _examples(self, row: dict[str, Any]) -> list[tuple[Any, list[ImageRef]]]:
        fmt, column, text_field = self.fmt, self.column, self.settings.text_field
        if self.formatting_func is not None:
            formatted = self.formatting_func(row)
            if isinstance(formatted, list) and len(formatted) == 1:  # older TRL batched style
                formatted = formatted[0]
            if isinstance(formatted, str):
                formatted = {"text": formatted}
            if not isinstance(formatted, Mapping):
                raise RowError(
                    "formatting_func", f"must return a str or a dict, got {type(formatted).__name__}"
                )
            row, column, text_field = dict(formatted), image_column(list(formatted)), None
            fmt = detect_format([c for c in row if c not in IMAGE_COLUMNS], "formatting_func output")
        text_row, refs = split_images(row, column, self.image_root)
        example = normalise_row(text_row, fmt, text_field, pairs_as_chat(fmt, self.settings.pair_template))
        trains = self.settings.train_on != "all"
        if isinstance(example, ChatExample) and trains and not _has_answer(example):
            raise RowError(
                "messages", "has no assistant turn to train on (train_on='all' trains every token)"
            )
        if self.settings.split_turns and isinstance(example, ChatExample):
            return [(part, refs[: count_images(part)]) for part in split_turns(example)]
        return [(example, refs)]

    @staticmethod
    def _put(out: dict[str, list[Any]], refs: list[ImageRef], issue: str, rewritten: int) -> int:
        """Append one output row (its tokens are filled in later); returns its index."""
        out["input_ids"].append([])
        out["labels"].append([])
        out["images"].append(refs)
        out["_issue"].append(issue)
        out["_rewritten"].append(rewritten)
        return len(out["_issue"]) - 1


def _has_answer(example: ChatExample) -> bool:
    return any(m["role"] == "assistant" for m in example.messages[example.first_trainable :])


def _where(ref: ImageRef, k: int) -> str:
    return f"images[{k}]" + (f" ({ref['path']})" if ref.get("path") else "")


# ---- a data set ------------------------------------------------------------------------------


def prepare_vision(
    dataset: Dataset | IterableDataset,
    processor: Any,
    settings: DataSettings,
    name: str = "train data",
    formatting_func: Callable[[dict[str, Any]], Any] | None = None,
    image_root: str | None = None,
) -> tuple[Dataset | IterableDataset, VisionPrepareStats]:
    """``prepare`` for a vision-language model's processor: rows with ``input_ids``, ``labels`` and
    ``images``, and the counts (``VisionPrepareStats``: also the images kept and the rows dropped
    because ``max_length`` would cut through an image)."""
    problems = settings.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    if isinstance(dataset, IterableDataset):
        dataset = guard_stream(dataset, name)
    columns = _columns(dataset, name)
    renames = dict(settings.columns) if settings.columns else {}
    if renames:
        renames = rename_columns(columns, renames, name)
    elif formatting_func is None and settings.text_field is None:
        renames = implied_columns([c for c in columns if c not in IMAGE_COLUMNS])
    if renames:
        dataset = dataset.rename_columns(renames)
        columns = _columns(dataset, name)
    column = image_column(columns)
    dataset = _undecoded(dataset, column)
    data_columns = [c for c in columns if c not in IMAGE_COLUMNS]
    fmt = None if formatting_func is not None else detect_format(data_columns, name, settings.text_field)
    if fmt is Format.TOKENIZED:
        raise DataError(
            f"{name}: pre-tokenized rows (input_ids) cannot carry images; give conversations (messages) "
            "with their images, which sftrainer tokenizes with the processor"
        )
    tokenizer = processor.tokenizer
    if tokenizer.eos_token_id is None:
        raise DataError(f"{name}: the tokenizer has no eos_token; set one so the model can learn to stop")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{name}: the processor's tokenizer has no chat template (sftrainer.vision sets one)")
    encoder = VisionTokenizer(
        processor,
        settings.max_length,
        settings.train_on,
        dict(settings.chat_template_kwargs),
        settings.truncation_mode,
    )
    fn = _VisionBatch(encoder, fmt, settings, formatting_func, column, image_root)
    fmt_name = "formatting_func" if fmt is None else fmt.value
    stats = VisionPrepareStats(name=name, format=f"{fmt_name}, chat template, images")
    temporary = ["_issue", "_rewritten"]
    if isinstance(dataset, IterableDataset):

        def strict(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
            out = fn(batch, indices)
            bad = [i for i in out["_issue"] if i not in (OK, TRUNCATED, EMPTY, IMAGE_CUT)]
            if bad and not settings.skip_invalid_rows:
                raise DataError(f"{name}: {bad[0]}")
            return out

        mapped = dataset.map(strict, batched=True, with_indices=True, remove_columns=columns)
        mapped = mapped.filter(lambda issue: issue in (OK, TRUNCATED), input_columns="_issue")
        logger.info("%s: streaming (%s); drop counts are not known in advance", name, stats.format)
        return mapped.remove_columns(temporary), stats

    mapped = dataset.map(
        fn,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        num_proc=settings.num_proc,
        desc=f"Tokenizing {name}",
        new_fingerprint=_fingerprint(dataset, fn, columns),
    )
    issues = mapped["_issue"]
    counts = Counter(i if i in (OK, TRUNCATED, EMPTY, IMAGE_CUT) else "invalid" for i in issues)
    invalid = [i for i in issues if i not in (OK, TRUNCATED, EMPTY, IMAGE_CUT)]
    if invalid and not settings.skip_invalid_rows:
        listed = "\n".join(f"  {p}" for p in invalid[:MAX_LISTED_PROBLEMS])
        more = (
            f"\n  ... and {len(invalid) - MAX_LISTED_PROBLEMS} more"
            if len(invalid) > MAX_LISTED_PROBLEMS
            else ""
        )
        raise DataError(
            f"{name}: {len(invalid)} of {len(issues)} rows cannot be used ({fmt_name} format, images):\n"
            f"{listed}{more}\nFix these rows, or set skip_invalid_rows=true to drop them (they are counted)."
        )
    stats.rows, stats.truncated = len(issues), counts[TRUNCATED]
    stats.dropped_empty, stats.dropped_image_cut = counts[EMPTY], counts[IMAGE_CUT]
    stats.dropped_invalid = len(invalid)
    if counts[OK] + counts[TRUNCATED] == 0:
        raise DataError(f"{name}: no row has any token to train on. {stats.summary(settings.max_length)}")
    if len(issues) != counts[OK] + counts[TRUNCATED]:
        mapped = mapped.filter(lambda issue: issue in (OK, TRUNCATED), input_columns="_issue")
    stats.kept = len(mapped)
    stats.rewritten_turns = sum(mapped["_rewritten"])
    stats.images = sum(len(refs) for refs in mapped["images"])
    dropped = stats.truncated or stats.dropped_empty or stats.dropped_invalid or stats.dropped_image_cut
    (logger.warning if dropped else logger.info)(stats.summary(settings.max_length))
    if stats.rewritten_warning():
        logger.warning(stats.rewritten_warning())
    return mapped.remove_columns(temporary), stats


def _columns(dataset: Dataset | IterableDataset, name: str) -> list[str]:
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise DataError(f"{name}: the data set has no rows")
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)
    if first is None:
        raise DataError(f"{name}: the data set has no rows")
    return list(first)


def _undecoded(dataset: Dataset | IterableDataset, column: str | None) -> Dataset | IterableDataset:
    """The data set with its image column read as stored ({"bytes", "path"}), not decoded by datasets:
    the rows' images are decoded here, with errors that name the row."""
    from datasets import Image

    feature = (dataset.features or {}).get(column) if column else None
    if feature is None:
        return dataset

    def undecoded(f: Any) -> Any:
        if isinstance(f, Image):
            return Image(decode=False)
        if hasattr(f, "feature"):
            f = copy.copy(f)
            f.feature = undecoded(f.feature)
        return f

    new = undecoded(feature)
    return dataset if new == feature else dataset.cast_column(column, new)


@functools.cache
def _code_version() -> str:
    """A hash of sftrainer's data code (datasets fingerprints a map by the function object only)."""
    import hashlib
    from pathlib import Path

    from sftrainer import __version__

    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _fingerprint(dataset: Dataset, fn: Any, columns: list[str]) -> str | None:
    from datasets.fingerprint import Hasher

    try:
        return Hasher.hash([dataset._fingerprint, fn, columns, _code_version()])
    except Exception:  # an unpicklable formatting_func or processor: datasets uses a random fingerprint
        return None


class CollapsedImages:
    """A processor's ``decode`` that writes each run of image tokens once, as ``<image>×576``: what
    ``sftrainer data`` and the run report show of a row (not 576 placeholders)."""

    def __init__(self, processor: Any):
        self.tokenizer = processor.tokenizer
        self.feature_ids = feature_token_ids(processor)

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        out, start = [], 0
        ids = list(ids)
        for k in range(1, len(ids) + 1):
            if k == len(ids) or (ids[k] in self.feature_ids) != (ids[start] in self.feature_ids):
                if ids[start] in self.feature_ids:
                    out.append(f"{self.tokenizer.convert_ids_to_tokens(ids[start])}×{k - start}")
                else:
                    out.append(self.tokenizer.decode(ids[start:k], **kwargs))
                start = k
        return "".join(out)
