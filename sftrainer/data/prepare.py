"""A raw data set -> tokenized rows (``input_ids``, ``labels``), with every problem counted.

Rows that cannot be used are reported together (row number, field, problem) rather than one at a
time; rows truncated to ``max_length`` are counted, and rows left with no trained token are dropped
and counted, so nothing disappears silently.

The one prepare path for text and for rows with images: the encoder (``tokenize.RowEncoder``) is the
strategy. ``ExampleTokenizer`` by default; the pipeline passes ``sftrainer.vision``'s for a processor,
and then the rows' images are carried through in an ``images`` column (list of the encoder's image
references), and rows that ``max_length`` would cut inside an image are dropped and counted
(``PrepareStats.dropped_image_cut``).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, List, Value

from sftrainer.constants import (
    IMAGE_COLUMNS,
    PAIR_TEMPLATES,
    TRAIN_ON,
    TRUNCATION_MODES,
)
from sftrainer.data.cache import auto_num_proc, cache_key, shared_heap
from sftrainer.data.formats import (
    REQUIRED_COLUMNS,
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
from sftrainer.data.problems import invalid_rows_error, refuse_mixed_formats
from sftrainer.data.tokenize import ExampleTokenizer, RowEncoder, Tokenized, tokenize_pretokenized
from sftrainer.errors import ConfigError, DataError, RowError, did_you_mean

logger = logging.getLogger(__name__)

# Values of the temporary "_issue" column.
OK, TRUNCATED, EMPTY, IMAGE_CUT = "", "truncated", "empty", "image_cut"  # image_cut: see RowEncoder
PREPARED_FEATURES = Features(
    {
        "input_ids": List(Value("int64")),
        "labels": List(Value("int64")),
        "_issue": Value("string"),
        "_rewritten": Value("int64"),
        "_same_role": Value("bool"),
        "_split": Value("bool"),
        "_inexact": Value("bool"),
        "_empty_reasoning": Value("int64"),
    }
)
TEMPORARY_COLUMNS = [name for name in PREPARED_FEATURES if name.startswith("_")]  # counted, then removed
# With an encoder that reads images: each row's images, as ``datasets`` stores an Image ({"bytes", "path"}).
IMAGES_FEATURE = List({"bytes": Value("binary"), "path": Value("string")})


@dataclass(frozen=True)
class DataSettings:
    """How rows become tokens. Mirrors the data fields of ``SFTConfig``."""

    max_length: int | None = 1024
    train_on: str = "response"
    pair_template: str = "auto"
    text_field: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    num_proc: int | None = None
    skip_invalid_rows: bool = False
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    split_turns: bool = False
    train_empty_reasoning: bool = False
    truncation_mode: str = "keep_start"
    overwrite_cache: bool = False

    def problems(self) -> list[str]:
        """Every invalid choice, as 'key: problem' (the one place these settings are checked)."""
        return [
            f"{key}: must be one of {choices}, got {value!r}{did_you_mean(str(value), choices)}"
            for key, value, choices in (
                ("train_on", self.train_on, TRAIN_ON),
                ("pair_template", self.pair_template, PAIR_TEMPLATES),
                ("truncation_mode", self.truncation_mode, TRUNCATION_MODES),
            )
            if value not in choices
        ]


@dataclass
class PrepareStats:
    name: str
    format: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_empty: int = 0
    dropped_invalid: int = 0
    rewritten_turns: int = 0  # assistant turns the template renders differently in the finished conversation
    same_role_rows: int = 0  # conversations with two consecutive turns of one role, rendered as given
    split_rows: int = 0  # rows added for turns that could not share a row with the turn before (encode.py)
    inexact_rows: int = 0  # rows whose later prompts could not be made to match inference exactly
    empty_reasoning_turns: int = (
        0  # answers after an empty reasoning block the template wrote, left untrained
    )
    streamed: bool = False  # counted as the stream is read: the rows read so far
    images: int | None = None  # images in the kept rows; None: the encoder reads no images
    dropped_image_cut: int = 0  # rows max_length would cut inside an image

    def summary(self, max_length: int | None) -> str:
        read = " read so far" if self.streamed else ""
        parts = [f"{self.name}: {self.rows} rows{read} ({self.format}), {self.kept} kept"]
        if self.truncated:
            parts.append(f"{self.truncated} truncated to max_length={max_length}")
        if self.dropped_empty:
            why = (
                f"; where the prompt fills max_length={max_length}, raise it or set truncation_mode='keep_end'"
                if max_length is not None
                else ""
            )
            parts.append(f"{self.dropped_empty} dropped: no trained token left (all -100{why})")
        if self.dropped_invalid:
            parts.append(f"{self.dropped_invalid} dropped as invalid (skip_invalid_rows=true)")
        if self.split_rows:
            parts.append(
                f"{self.split_rows} row(s) added: a later turn's prompt tokenizes an earlier answer "
                "differently from how it was trained (or after an added EOS), so it starts a row of its own"
            )
        if self.inexact_rows:
            parts.append(f"{self.inexact_rows} row(s) with a later prompt that differs from inference")
        if self.images is not None:
            parts.append(f"{self.images} images")
        if self.dropped_image_cut:
            parts.append(
                f"{self.dropped_image_cut} dropped: max_length={max_length} would cut through an image's "
                "tokens (raise max_length)"
            )
        return ", ".join(parts)

    def same_role_note(self) -> str | None:
        if not self.same_role_rows:
            return None
        return (
            f"{self.name}: {self.same_role_rows} conversation(s) have two consecutive turns of the same role "
            "(user after user, ...); they are rendered as given by the chat template, not merged. "
            "Merge such turns if the model expects roles to alternate."
        )

    def empty_reasoning_note(self) -> str | None:
        if not self.empty_reasoning_turns:
            return None
        return (
            f"{self.name}: {self.empty_reasoning_turns} assistant turn(s) carry no reasoning, and the chat "
            "template writes an empty reasoning block before them (Qwen3: <think>\\n\\n</think>): the block "
            "is not trained, as it is the prompt in non-thinking mode and the model writes its reasoning "
            "there in thinking mode (training it empty teaches the model to skip thinking). "
            "train_empty_reasoning=true trains it."
        )

    def rewritten_warning(self) -> str | None:
        if not self.rewritten_turns:
            return None
        return (
            f"{self.name}: the chat template does not render the reasoning or text of "
            f"{self.rewritten_turns} trained assistant turn(s) as the data gives it (templates drop the "
            "reasoning of past turns; some never render `reasoning_content` and expect <think> in the "
            "content); they are trained as the finished conversation renders them. split_turns=true "
            "trains each assistant turn as its own example, rendered as at inference."
        )


class _TokenizeBatch:
    """The function given to ``Dataset.map``: a batch of raw rows -> token rows + an issue per row
    (and each row's images, where the encoder reads them).

    With ``split_turns`` one conversation gives one output row per trained assistant turn.
    """

    def __init__(
        self,
        encoder: RowEncoder,
        fmt: Format | None,
        settings: DataSettings,
        formatting_func: Callable[[dict[str, Any]], Any] | None,
    ):
        self.encoder = encoder
        self.fmt = fmt
        self.settings = settings
        self.formatting_func = formatting_func

    @property
    def columns(self) -> list[str]:
        return [*PREPARED_FEATURES, *(["images"] if self.encoder.images is not None else [])]

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        keys = list(batch)
        rows = [dict(zip(keys, values)) for values in zip(*batch.values())]
        out: dict[str, list[Any]] = {name: [] for name in self.columns}
        plan: list[tuple[Any, ...]] = []  # per example: ("row", Tokenized), ("error", issue), or its render
        rendered: list[tuple[Any, list[Any]]] = []
        images: list[list[Any]] = []
        for row, index in zip(rows, indices):
            try:
                if self.fmt is Format.TOKENIZED:
                    use_masks = self.settings.train_on != "all"
                    plan.append(("row", tokenize_pretokenized(row, self.encoder.max_length, use_masks)))
                    continue
                examples = self._examples(row)
                before = self.encoder.untrained_empty_reasoning
                renders = [self.encoder.render(example, refs) for example, refs in examples]
                empty_reasoning = self.encoder.untrained_empty_reasoning - before
            except RowError as err:
                plan.append(("error", f"row {index + 1}: {err}"))
                continue
            same_role = any(_same_role(example) for example, _ in examples)
            for k, ((example, refs), (segments, rewritten)) in enumerate(zip(examples, renders)):
                plan.append(
                    ("rendered", len(rendered), rewritten, same_role, empty_reasoning if k == 0 else 0, index)
                )
                rendered.append((example, segments))
                images.append(refs)
        has_images = self.encoder.images is not None
        encoded = self.encoder.encode(rendered, images) if has_images else self.encoder.encode(rendered)
        for item in plan:
            if item[0] == "row":
                self._put(out, item[1])
            elif item[0] == "error":
                self._put(out, None, item[1])
            else:  # an example's rows: more than one where its turns could not share a row
                _, k, rewritten, same_role, empty_reasoning, index = item
                result = encoded[k]
                if isinstance(result, RowError):
                    self._put(out, None, f"row {index + 1}: {result}")
                    continue
                if result is None:  # the encoder drops it: max_length would cut inside an image
                    self._put(out, None, IMAGE_CUT)
                    continue
                for n, tokenized in enumerate(result):
                    first = n == 0
                    self._put(
                        out,
                        tokenized,
                        OK,
                        rewritten if first else 0,
                        same_role and first,
                        not first,
                        empty_reasoning if first else 0,
                        images[k] if first else [],  # an encoder that reads images keeps one row each
                    )
        return out

    def _examples(self, row: dict[str, Any]) -> list[tuple[Any, list[Any]]]:
        """The row's examples, each with the images it holds."""
        example, refs = self._example(row)
        if isinstance(example, ChatExample) and self.settings.train_on != "all":
            _check_has_answer(example, self.fmt)
        if self.settings.split_turns and isinstance(example, ChatExample):
            parts = split_turns(example)
            if self.encoder.images is None:
                return [(part, []) for part in parts]
            return [(part, self.encoder.images.held_by(part, refs)) for part in parts]
        return [(example, refs)]

    def _truncate(self, tokenized: Tokenized) -> Tokenized:
        """keep_end: the encoder kept whole rows (max_length=None); keep their last max_length tokens."""
        n = self.settings.max_length
        if self.settings.truncation_mode != "keep_end" or n is None or len(tokenized.input_ids) <= n:
            return tokenized
        return Tokenized(tokenized.input_ids[-n:], tokenized.labels[-n:], True, tokenized.inexact)

    def _split(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
        """The row without its images, and its images (none for a text encoder)."""
        if self.encoder.images is None:
            return row, []
        return self.encoder.images.split(row)

    def _example(self, row: dict[str, Any]) -> tuple[Any, list[Any]]:
        if self.formatting_func is None:
            assert self.fmt is not None  # detected from the data set's columns
            text_row, refs = self._split(row)
            as_chat = pairs_as_chat(self.fmt, self.settings.pair_template)
            return normalise_row(text_row, self.fmt, self.settings.text_field, as_chat), refs
        formatted = self.formatting_func(row)
        if isinstance(formatted, list) and len(formatted) == 1:  # older TRL batched style
            formatted = formatted[0]
        if isinstance(formatted, str):
            return normalise_row({"text": formatted}, Format.TEXT, None, False), []
        if isinstance(formatted, Mapping):
            text_row, refs = self._split(dict(formatted))
            columns = list(text_row)
            if self.encoder.images is not None:
                columns = [c for c in columns if c not in IMAGE_COLUMNS]
            fmt = detect_format(columns, "formatting_func output")
            as_chat = pairs_as_chat(fmt, self.settings.pair_template)
            return normalise_row(text_row, fmt, None, as_chat), refs
        raise RowError("formatting_func", f"must return a str or a dict, got {type(formatted).__name__}")

    def _put(
        self,
        out: dict[str, list[Any]],
        tokenized: Tokenized | None,
        issue: str = OK,
        rewritten: int = 0,
        same_role: bool = False,
        split: bool = False,
        empty_reasoning: int = 0,
        images: list[Any] | None = None,
    ) -> None:
        """Append one output row."""
        tokenized = self._truncate(tokenized) if tokenized is not None else None
        out["input_ids"].append(tokenized.input_ids if tokenized is not None else [])
        out["labels"].append(tokenized.labels if tokenized is not None else [])
        out["_issue"].append(_issue_of(tokenized) if tokenized is not None else issue)
        out["_rewritten"].append(rewritten)
        out["_same_role"].append(same_role)
        out["_split"].append(split)
        out["_inexact"].append(tokenized is not None and tokenized.inexact)
        out["_empty_reasoning"].append(empty_reasoning)
        if "images" in out:
            out["images"].append(images or [])


def _check_has_answer(example: ChatExample, fmt: Format | None) -> None:
    """A conversation with no assistant turn to train (only a prompt, or only a system message)
    would be all -100: refused by name rather than dropped as 'no trained token left'."""
    if any(m["role"] == "assistant" for m in example.messages[example.first_trainable :]):
        return
    field = REQUIRED_COLUMNS[fmt][0] if fmt in (Format.MESSAGES, Format.SHAREGPT) else "messages"
    if fmt in (Format.PROMPT_COMPLETION, Format.PROMPT_RESPONSE):
        field = "completion" if fmt is Format.PROMPT_COMPLETION else "response"
    roles = ", ".join(m["role"] for m in example.messages)
    raise RowError(
        field,
        f"has no assistant turn to train on (roles: {roles}). Add the answer, drop such rows with "
        "skip_invalid_rows=true, or set train_on='all' to train on every token",
    )


def _same_role(example: Any) -> bool:
    """Two consecutive turns of one role (tool results may follow each other: parallel calls)."""
    if not isinstance(example, ChatExample):
        return False
    roles = [m["role"] for m in example.messages]
    return any(a == b and a != "tool" for a, b in itertools.pairwise(roles))


def _issue_of(tokenized: Tokenized) -> str:
    if tokenized.n_trained == 0:
        return EMPTY
    return TRUNCATED if tokenized.truncated else OK


def prepare(
    dataset: Dataset | IterableDataset,
    tokenizer: Any,
    settings: DataSettings,
    name: str = "train data",
    formatting_func: Callable[[dict[str, Any]], Any] | None = None,
    encoder: RowEncoder | None = None,
) -> tuple[Dataset | IterableDataset, PrepareStats]:
    """Tokenize a data set. Returns rows with ``input_ids`` and ``labels`` only (and ``images`` where
    the encoder reads them), and the counts. ``encoder``: the strategy that tokenizes (default
    ``text_encoder(tokenizer, settings)``; then ``tokenizer`` is not used)."""
    problems = settings.problems()
    if problems:
        raise ConfigError("; ".join(problems))
    origin = origin_of(dataset)  # where the rows come from, for messages
    if isinstance(dataset, IterableDataset):
        dataset = guard_stream(dataset, name)
    encoder = encoder if encoder is not None else text_encoder(tokenizer, settings)
    columns = column_names(dataset, name)
    if settings.columns:
        dataset = dataset.rename_columns(rename_columns(columns, settings.columns, name))
        columns = column_names(dataset, name)
    elif formatting_func is None and settings.text_field is None and implied_columns(_data(columns, encoder)):
        mapping = implied_columns(_data(columns, encoder))
        dataset = dataset.rename_columns(mapping)
        columns = column_names(dataset, name)
        logger.info(
            "%s: columns %s read as %s (set data.columns to map them otherwise)",
            name,
            ", ".join(f"{a} -> {b}" for a, b in mapping.items()),
            ", ".join(sorted(mapping.values())),
        )
    if formatting_func is None and "chosen" in columns:
        logger.info("%s: preference data: the chosen answers are trained; 'rejected' is not used", name)
    if encoder.images is not None:
        dataset = encoder.images.readable(dataset)
    fmt = (
        None
        if formatting_func is not None
        else detect_format(_data(columns, encoder), where(name, origin), settings.text_field)
    )
    if fmt is Format.TOKENIZED and encoder.images is not None:
        raise DataError(
            f"{name}: pre-tokenized rows (input_ids) cannot carry images; give conversations (messages) "
            "with their images, which sftrainer tokenizes with the processor"
        )
    if fmt is not None and settings.text_field is None and not settings.skip_invalid_rows:
        refuse_mixed_formats(dataset, fmt, name, origin)
    fmt_name = "formatting_func" if fmt is None else fmt.value
    tokenizer = encoder.tokenizer
    fn = _TokenizeBatch(encoder, fmt, settings, formatting_func)
    uses_chat = fmt in (Format.MESSAGES, Format.SHAREGPT) or (
        fmt in (Format.ALPACA, Format.PROMPT_RESPONSE, Format.PROMPT_COMPLETION)
        and pairs_as_chat(fmt, settings.pair_template)
    )
    if fmt is not Format.TOKENIZED and tokenizer.eos_token_id is None:
        raise DataError(f"{name}: the tokenizer has no eos_token; set one so the model can learn to stop")
    if uses_chat and not getattr(tokenizer, "chat_template", None):
        # Otherwise every row would fail alone, and the message would blame the rows.
        raise DataError(
            f"{name}: {fmt_name} rows are rendered with a chat template, and the tokenizer has none. "
            "Set chat_template (sftrainer.model.prepare_tokenizer gives a tokenizer sftrainer's default), "
            "or pair_template='raw' to train prompt/response pairs as plain text."
        )
    if fmt is not None and fmt is not Format.TOKENIZED and fmt is not Format.TEXT:
        if uses_chat:
            fmt_name += ", chat template"
        elif fmt is Format.PROMPT_COMPLETION:  # string pairs raw; message-list pairs still use the template
            fmt_name += ", raw (message lists: chat template)"
        else:
            fmt_name += ", raw"
    stats = PrepareStats(name=name, format=fmt_name)
    if encoder.images is not None:
        stats.format += ", images"
        stats.images = 0
    features = (
        Features({**PREPARED_FEATURES, "images": IMAGES_FEATURE}) if encoder.images else PREPARED_FEATURES
    )

    if isinstance(dataset, IterableDataset):
        return _prepare_iterable(dataset, fn, columns, stats), stats

    # How many processes prepare it, and whether a cached copy may be used, do not change the rows.
    decides = dataclasses.replace(settings, num_proc=None, overwrite_cache=False)
    fingerprint = cache_key(dataset, [decides, fn.encoder, fn.fmt, fn.formatting_func], columns)
    num_proc = settings.num_proc if settings.num_proc is not None else auto_num_proc(len(dataset))
    if settings.num_proc is None and fingerprint is None:
        num_proc = 1  # what cannot be pickled (a formatting_func) cannot be sent to other processes
    if settings.num_proc is None and num_proc > 1:
        logger.info(
            "%s: tokenizing in %d processes (dataset_num_proc unset: one per CPU core for large data sets; "
            "TRL uses one process; set dataset_num_proc to choose)",
            name,
            num_proc,
        )
    with shared_heap(num_proc):
        mapped = dataset.map(
            fn,
            batched=True,
            with_indices=True,
            remove_columns=columns,
            num_proc=num_proc if num_proc > 1 else None,
            features=features,  # typed: Arrow infers the type of a list of ints 15x slower
            load_from_cache_file=False if settings.overwrite_cache else None,  # None: datasets' setting
            desc=f"Tokenizing {name}",
            new_fingerprint=fingerprint,
        )
    # Counted on the Arrow columns: reading a column through datasets formats it row by row.
    issues = mapped.data.column("_issue")
    counts = {k["values"]: k["counts"] for k in pc.value_counts(issues).to_pylist()}
    stats.rows = len(issues)
    stats.truncated = counts.get(TRUNCATED, 0)
    stats.dropped_empty = counts.get(EMPTY, 0)
    stats.dropped_image_cut = counts.get(IMAGE_CUT, 0)
    usable = pc.is_in(issues, value_set=pa.array([OK, TRUNCATED]))
    invalid_mask = pc.invert(pc.or_(usable, pc.is_in(issues, value_set=pa.array([EMPTY, IMAGE_CUT]))))
    invalid = pc.filter(issues, invalid_mask).to_pylist()
    if invalid and not settings.skip_invalid_rows:
        raise invalid_rows_error(name, invalid, len(issues), f"{fmt_name} format", origin)
    stats.dropped_invalid = len(invalid)
    kept = np.flatnonzero(usable.to_numpy(zero_copy_only=False))
    if kept.size == 0:
        raise DataError(f"{name}: no row has any token to train on. {stats.summary(settings.max_length)}")
    stats.rewritten_turns = int(pc.sum(pc.filter(mapped.data.column("_rewritten"), usable)).as_py() or 0)
    stats.same_role_rows = int(pc.sum(pc.filter(mapped.data.column("_same_role"), usable)).as_py() or 0)
    stats.split_rows = int(pc.sum(pc.filter(mapped.data.column("_split"), usable)).as_py() or 0)
    stats.inexact_rows = int(pc.sum(pc.filter(mapped.data.column("_inexact"), usable)).as_py() or 0)
    stats.empty_reasoning_turns = int(
        pc.sum(pc.filter(mapped.data.column("_empty_reasoning"), usable)).as_py() or 0
    )
    if stats.images is not None:
        kept_images = pc.filter(mapped.data.column("images"), usable)
        stats.images = int(pc.sum(pc.list_value_length(kept_images)).as_py() or 0)
    mapped = mapped.remove_columns(TEMPORARY_COLUMNS)
    if kept.size < stats.rows:
        mapped = mapped.select(kept)
    stats.kept = len(mapped)
    dropped = stats.truncated or stats.dropped_empty or stats.dropped_invalid or stats.dropped_image_cut
    log = logger.warning if dropped else logger.info
    log(stats.summary(settings.max_length))
    for note in (stats.same_role_note(), stats.empty_reasoning_note()):
        if note:
            logger.info(note)
    if stats.rewritten_warning():
        logger.warning(stats.rewritten_warning())
    return mapped, stats


def text_encoder(tokenizer: Any, settings: DataSettings) -> ExampleTokenizer:
    """The text ``RowEncoder`` for ``settings``: with keep_end it keeps whole rows, and ``prepare``
    keeps their last ``max_length`` tokens."""
    keep_start = settings.truncation_mode == "keep_start"
    return ExampleTokenizer(
        tokenizer,
        settings.max_length if keep_start else None,
        settings.train_on,
        dict(settings.chat_template_kwargs),
        train_empty_reasoning=settings.train_empty_reasoning,
    )


def _data(columns: list[str], encoder: RowEncoder) -> list[str]:
    """The columns that hold a row's text (an encoder that reads images reads the image columns)."""
    return columns if encoder.images is None else [c for c in columns if c not in IMAGE_COLUMNS]


def _prepare_iterable(
    dataset: IterableDataset, fn: _TokenizeBatch, columns: list[str], stats: PrepareStats
) -> IterableDataset:
    """Lazy version: problems surface when a bad row is reached; ``stats`` counts the rows read so
    far (in this process: DataLoader worker processes count their own)."""
    stats.streamed = True

    def strict(batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        out = fn(batch, indices)
        bad = [i for i in out["_issue"] if i not in (OK, TRUNCATED, EMPTY, IMAGE_CUT)]
        if bad and not fn.settings.skip_invalid_rows:
            raise DataError(f"{stats.name}: {bad[0]}")
        issues = out["_issue"]
        stats.rows += len(issues)
        stats.truncated += issues.count(TRUNCATED)
        stats.dropped_empty += issues.count(EMPTY)
        stats.dropped_image_cut += issues.count(IMAGE_CUT)
        stats.dropped_invalid += len(bad)
        stats.kept += issues.count(OK) + issues.count(TRUNCATED)
        stats.split_rows += sum(out["_split"])
        stats.inexact_rows += sum(out["_inexact"])
        stats.empty_reasoning_turns += sum(out["_empty_reasoning"])
        if stats.images is not None:
            stats.images += sum(len(refs) for refs, i in zip(out["images"], issues) if i in (OK, TRUNCATED))
        return out

    mapped = dataset.map(strict, batched=True, with_indices=True, remove_columns=columns)
    mapped = mapped.filter(
        lambda issues: [issue in (OK, TRUNCATED) for issue in issues], input_columns="_issue", batched=True
    )
    logger.info(
        "%s: streaming (%s); rows are counted as they are read (truncated, dropped), "
        "and the counts are logged at the end of training",
        stats.name,
        stats.format,
    )
    return mapped.remove_columns(TEMPORARY_COLUMNS)


def column_names(dataset: Dataset | IterableDataset, name: str) -> list[str]:
    """The data set's columns; a DataError naming it when it has no rows."""
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise DataError(f"{name}: the data set has no rows")
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset), None)  # an IterableDataset may not know its columns before reading
    if first is None:
        raise DataError(f"{name}: the data set has no rows")
    return list(first)
