"""A vision-language data set -> rows with ``input_ids``, ``labels`` and ``images``, with every
problem counted (``prepare`` of the text pipeline, for a processor; the tokens come from
``sftrainer.vision.encode.VisionTokenizer``).

Output rows (``prepare_vision``): ``input_ids`` list[int], ``labels`` list[int] (``IGNORE_INDEX`` on
every untrained and every image token), ``images`` list of ``{"bytes", "path"}`` (decoded by
``vision.collate.VisionCollator``, which makes the pixel tensors batch by batch). Rows that cannot be
used are listed together (row number, field, problem); rows ``max_length`` would cut inside an image
are dropped and counted (``VisionPrepareStats.dropped_image_cut``).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from datasets import Dataset, IterableDataset

from sftrainer.constants import IMAGE_COLUMNS
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
from sftrainer.data.load import guard_stream
from sftrainer.data.origin import origin_of, where
from sftrainer.data.pack import best_fit_decreasing, pack_dataset
from sftrainer.data.prepare import (
    EMPTY,
    OK,
    TRUNCATED,
    DataSettings,
    PrepareStats,
    cache_key,
    column_names,
    invalid_rows_error,
    shared_heap,
)
from sftrainer.data.tokenize import Segment
from sftrainer.errors import ConfigError, DataError, RowError
from sftrainer.vision.encode import VisionTokenizer
from sftrainer.vision.images import ImageRef, count_images, image_column, load_image, split_images

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
        out: dict[str, list[Any]] = {
            k: [] for k in ("input_ids", "labels", "images", "_issue", "_rewritten", "_inexact")
        }
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
                out["_inexact"][slot] = result.inexact
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
        assert fmt is not None  # the data set's format, or the formatting_func output's, detected above
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
        out["_inexact"].append(False)
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
    origin = origin_of(dataset)  # where the rows come from, for messages
    if isinstance(dataset, IterableDataset):
        dataset = guard_stream(dataset, name)
    columns = column_names(dataset, name)
    renames = dict(settings.columns) if settings.columns else {}
    if renames:
        renames = rename_columns(columns, renames, name)
    elif formatting_func is None and settings.text_field is None:
        renames = implied_columns([c for c in columns if c not in IMAGE_COLUMNS])
    if renames:
        dataset = dataset.rename_columns(renames)
        columns = column_names(dataset, name)
    column = image_column(columns)
    dataset = _undecoded(dataset, column)
    data_columns = [c for c in columns if c not in IMAGE_COLUMNS]
    fmt = (
        None
        if formatting_func is not None
        else detect_format(data_columns, where(name, origin), settings.text_field)
    )
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
        settings.train_empty_reasoning,
    )
    fn = _VisionBatch(encoder, fmt, settings, formatting_func, column, image_root)
    fmt_name = "formatting_func" if fmt is None else fmt.value
    stats = VisionPrepareStats(name=name, format=f"{fmt_name}, chat template, images")
    temporary = ["_issue", "_rewritten", "_inexact"]
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

    with shared_heap(settings.num_proc):
        mapped = dataset.map(
            fn,
            batched=True,
            with_indices=True,
            remove_columns=columns,
            num_proc=settings.num_proc,
            load_from_cache_file=False if settings.overwrite_cache else None,  # None: datasets' setting
            desc=f"Tokenizing {name}",
            new_fingerprint=cache_key(
                dataset, settings, [fn.encoder, fn.fmt, fn.formatting_func, fn.column, fn.image_root], columns
            ),
        )
    issues = mapped["_issue"]
    counts = Counter(i if i in (OK, TRUNCATED, EMPTY, IMAGE_CUT) else "invalid" for i in issues)
    invalid = [i for i in issues if i not in (OK, TRUNCATED, EMPTY, IMAGE_CUT)]
    if invalid and not settings.skip_invalid_rows:
        raise invalid_rows_error(name, invalid, len(issues), f"{fmt_name} format, images", origin)
    stats.rows, stats.truncated = len(issues), counts[TRUNCATED]
    stats.dropped_empty, stats.dropped_image_cut = counts[EMPTY], counts[IMAGE_CUT]
    stats.dropped_invalid = len(invalid)
    if counts[OK] + counts[TRUNCATED] == 0:
        raise DataError(f"{name}: no row has any token to train on. {stats.summary(settings.max_length)}")
    if len(issues) != counts[OK] + counts[TRUNCATED]:
        mapped = mapped.filter(lambda issue: issue in (OK, TRUNCATED), input_columns="_issue")
    stats.kept = len(mapped)
    stats.rewritten_turns = sum(mapped["_rewritten"])
    stats.inexact_rows = sum(mapped["_inexact"])
    stats.images = sum(len(refs) for refs in mapped["images"])
    dropped = stats.truncated or stats.dropped_empty or stats.dropped_invalid or stats.dropped_image_cut
    (logger.warning if dropped else logger.info)(stats.summary(settings.max_length))
    if stats.rewritten_warning():
        logger.warning(stats.rewritten_warning())
    return mapped.remove_columns(temporary), stats


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


def pack_with_images(dataset: Dataset, max_length: int, strategy: str = "bfd") -> tuple[Dataset, Any]:
    """``pack.pack_dataset`` for rows with ``images``: each packed sequence gets its rows' images, in
    the order of its rows (the order the model meets their image tokens).

    Only whole rows can carry their images (``bfd``): a row split across sequences would be parted
    from them. The rows' placement is recomputed here (best-fit decreasing is deterministic) and
    checked against the packed tokens, so the images can never land in another row's sequence.
    """
    import numpy as np
    import pyarrow as pa

    if strategy != "bfd":
        raise ConfigError(
            f"packing_strategy='{strategy}' splits rows across sequences, which would part a row's tokens "
            "from its images; use packing_strategy='bfd' (whole rows) for image data"
        )
    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    packed, stats = pack_dataset(dataset.remove_columns("images"), max_length, strategy)
    ids = dataset.data.column("input_ids").combine_chunks()
    lengths = np.diff(ids.offsets.to_numpy().astype(np.int64))
    bins = best_fit_decreasing(lengths, max_length)
    order = np.lexsort((-lengths, bins))  # as pack_dataset lays the rows out: by bin, longest first
    want = ids.take(pa.array(order)).flatten().to_numpy(zero_copy_only=False)
    got = packed.data.column("input_ids").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if not np.array_equal(want, got):
        raise RuntimeError(
            "pack_with_images: the packed rows are not in the order it expects (pack.py changed?)"
        )
    images = dataset.data.column("images").combine_chunks().take(pa.array(order))
    counts = np.diff(images.offsets.to_numpy().astype(np.int64))
    per_bin = np.bincount(bins[order], weights=counts, minlength=len(packed)).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_bin)]), pa.int32())
    table = packed.data.table.append_column("images", pa.ListArray.from_arrays(offsets, images.flatten()))
    return Dataset(table), stats
