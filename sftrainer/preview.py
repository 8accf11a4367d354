"""See the data before spending compute: what ``sftrainer data`` shows of one data set.

The rows are prepared by training's own ``DataPipeline`` (``sftrainer.pipeline``; ``shuffle=False``, and
the rows shown before packing), so they are the rows trained, and then described: format and column mapping,
row counts, a token-length histogram, rendered rows with the trained tokens marked, and the chat
template in use with where it came from. Everything here is a pure function of prepared rows, a
tokenizer and settings, so tests call each one directly; ``sftrainer.preflight`` adds the run-level
numbers (steps, time, memory, warnings).

Marked rows: on a terminal the trained tokens are green (ANSI colour); elsewhere each trained span
is written between ``⟦`` and ``⟧`` (U+27E6 / U+27E7, characters real data practically never holds;
``[[`` / ``]]`` where the output encoding cannot write them). Everything outside the markers is
context the model reads but is not trained on.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset

from sftrainer import builtin, memory_estimate, png, preflight
from sftrainer.constants import FIRST_ROWS, IGNORE_INDEX, ROW_TOKEN_LIMIT, STREAM_PREVIEW_ROWS
from sftrainer.data import load as data_load
from sftrainer.data.content import ContentCounts, classify_columns, content_of
from sftrainer.data.formats import implied_columns
from sftrainer.data.mixture import Mixture, SourceUse, format_sources
from sftrainer.data.pack import PackStats
from sftrainer.data.prepare import PrepareStats
from sftrainer.data.stats import RowArrays, count_duplicates, row_arrays
from sftrainer.errors import ConfigError, DataError
from sftrainer.generate import stop_token_ids
from sftrainer.lora import peft_config_from
from sftrainer.pipeline import DataPipeline
from sftrainer.setup import load_processing_class, prepare_processing_class
from sftrainer.sources import resolve_data
from sftrainer.vision.processor import is_processor, preview_decoder, text_tokenizer

MARKERS = ("⟦", "⟧")
ASCII_MARKERS = ("[[", "]]")
ANSI_TRAINED, ANSI_RESET = "\033[1;32m", "\033[0m"  # bold green: trained tokens
HISTOGRAM_BINS = 12
HISTOGRAM_WIDTH = 40  # characters of the longest bar


# ---- preparing --------------------------------------------------------------------------------


def prepare_for_preview(
    dataset: Any, tokenizer: Any, args: Any, name: str = "train data"
) -> tuple[Dataset, PrepareStats, PackStats | None]:
    """The rows as training prepares them (``DataPipeline`` without the shuffle): the unpacked rows,
    their counts, and the packing counts when ``args.packing``."""
    prepared, stats, pack, _ = _prepare_with_sources(dataset, tokenizer, args, name)
    return prepared, stats, pack


def _prepare_with_sources(
    dataset: Any, tokenizer: Any, args: Any, name: str, pipeline: DataPipeline | None = None
) -> tuple[Dataset, PrepareStats, PackStats | None, list[PrepareStats]]:
    """``prepare_for_preview``, plus each source's counts for a mixture: the run's own ``DataPipeline``
    (``shuffle=False``, keeping the rows before packing; ``pipeline``: one made so, shared by the data sets
    of a run, which then says each difference from TRL once, as training does)."""
    pipeline = pipeline or preview_pipeline(tokenizer, args)
    pipeline(dataset, name, args.packing)
    return (
        pipeline.rows[name],
        pipeline.data_stats[name],
        pipeline.pack_stats.get(name),
        pipeline.source_stats.get(name, []),
    )


def preview_pipeline(tokenizer: Any, args: Any) -> DataPipeline:
    """The pipeline training prepares data with, as ``sftrainer data`` runs it: rows left in order
    (``shuffle=False``) and kept before packing (``rows``)."""
    return DataPipeline(tokenizer, args, shuffle=False, keep_rows=True)


def column_mapping(
    columns: list[str], renames: dict[str, str] | None, text_field: str | None
) -> dict[str, str]:
    """How the data's columns are read: ``data.columns`` when given, else the mapping a known public
    layout implies (as ``prepare`` applies it); {} when the columns already name a format."""
    if renames:
        return dict(renames)
    if text_field is not None:
        return {}
    return implied_columns(columns)


# ---- the histogram -------------------------------------------------------------------------------


@dataclass
class Histogram:
    edges: list[int]  # bin k holds lengths in [edges[k], edges[k + 1])
    counts: list[int]

    @property
    def total(self) -> int:
        return sum(self.counts)


def length_histogram(lengths: np.ndarray, bins: int = HISTOGRAM_BINS) -> Histogram:
    """Rows per token-length bin: up to ``bins`` equal-width integer bins from the shortest row to
    the longest."""
    lo = int(lengths.min()) if lengths.size else 0
    hi = int(lengths.max()) if lengths.size else 0
    width = max(1, math.ceil((hi - lo + 1) / bins))
    n = max(1, math.ceil((hi - lo + 1) / width))
    edges = [lo + k * width for k in range(n + 1)]
    counts = np.histogram(lengths, bins=edges)[0] if lengths.size else np.zeros(n, int)
    return Histogram(edges, [int(c) for c in counts])


def format_histogram(hist: Histogram, bar: str = "#", width: int = HISTOGRAM_WIDTH) -> str:
    peak = max(hist.counts) if hist.counts else 0
    label_w = len(f"{hist.edges[-1] - 1}") * 2 + 1
    lines = []
    for k, count in enumerate(hist.counts):
        label = f"{hist.edges[k]}-{hist.edges[k + 1] - 1}"
        n = round(width * count / peak) if peak else 0
        lines.append(f"  {label:>{label_w}} | {bar * n}{'' if n or not count else '.'} {count}")
    return "\n".join(lines)


def write_histogram_png(path: str, hist: Histogram, max_length: int | None) -> None:
    png.write_bars(
        path,
        "token length histogram",
        [(f"{lo}", count) for lo, count in zip(hist.edges, hist.counts)],
        marker=None if max_length is None else f"max {max_length}",
        marker_at=None if max_length is None else _bin_of(hist, max_length),
    )


def _bin_of(hist: Histogram, value: int) -> float | None:
    """Where ``value`` falls, in bars from the left edge; None when it is past the last bin."""
    if value > hist.edges[-1]:
        return None
    return (value - hist.edges[0]) / (hist.edges[1] - hist.edges[0])


# ---- rendered rows -------------------------------------------------------------------------------


def trained_spans(ids: list[int], labels: list[int], tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, trained) runs of one row: consecutive tokens with the same trained-ness, decoded
    together (special tokens kept, so the end-of-turn token shows)."""
    spans: list[tuple[str, bool]] = []
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or (labels[k] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            spans.append((tokenizer.decode(ids[start:k]), labels[start] != IGNORE_INDEX))
            start = k
    return spans


def render_row(
    ids: list[int],
    labels: list[int],
    tokenizer: Any,
    colour: bool = False,
    markers: tuple[str, str] = MARKERS,
    limit: int = ROW_TOKEN_LIMIT,
) -> str:
    """One row's text with its trained spans in colour (``colour``) or between ``markers``."""
    more = len(ids) - limit
    ids, labels = list(ids[:limit]), list(labels[:limit])
    out = []
    for text, trained in trained_spans(ids, labels, tokenizer):
        if not trained:
            out.append(text)
        elif colour:
            out.append(f"{ANSI_TRAINED}{text}{ANSI_RESET}")
        else:
            out.append(f"{markers[0]}{text}{markers[1]}")
    if more > 0:
        out.append(f" ... ({more} more tokens)")
    return "".join(out)


def markers_for(encoding: str | None) -> tuple[str, str]:
    """``MARKERS`` where the output encoding can write them, else ``ASCII_MARKERS``."""
    try:
        "".join(MARKERS).encode(encoding or "ascii")
        return MARKERS
    except (UnicodeEncodeError, LookupError):
        return ASCII_MARKERS


# ---- the chat template ---------------------------------------------------------------------------


def template_source(
    own_template: Any, chat_template: str | None, chat_template_path: str | None, model: str
) -> str:
    """Where the chat template in use comes from, in the order ``prepare_tokenizer`` applies them."""
    if chat_template:
        one_line = "\n" not in chat_template and "{" not in chat_template
        return f"the chat_template setting ({chat_template if one_line else 'Jinja text in the config'})"
    if chat_template_path:
        return f"chat_template_path ({chat_template_path})"
    if own_template:
        return f"the tokenizer's own ({model})"
    return "sftrainer's built-in default (the tokenizer has none): '### User:' / '### Assistant:' headers"


# ---- the whole preview -----------------------------------------------------------------------


@dataclass
class DataPreview:
    """What ``sftrainer data`` shows of one data set."""

    name: str
    source: str
    columns: list[str]
    mapping: dict[str, str]
    stats: PrepareStats
    arrays: RowArrays
    pack: PackStats | None
    duplicates: int
    sources: list[SourceUse] = dataclasses.field(default_factory=list)  # a mixture's, each
    ignored: list[str] = dataclasses.field(default_factory=list)  # columns present, not read
    content: ContentCounts | None = None  # of the rows read (a mixture: of the rows drawn)

    def summary_lines(self, max_length: int | None) -> list[str]:
        s = self.stats
        mapping = ", ".join(f"{a} -> {b}" for a, b in self.mapping.items()) or "as named"
        read = [c for c in self.columns if c not in self.ignored]
        ignored = f"; ignored (not read): {', '.join(self.ignored)}" if self.ignored else ""
        columns = (
            "each source's own (sources, below)"
            if self.sources
            else f"{', '.join(read)} (read {mapping}){ignored}"
        )
        lines = [
            f"{self.name}: {self.source}",
            f"  format: {s.format}; columns: {columns}",
            f"  rows: {s.rows} read, {s.kept} kept, {s.truncated} truncated to max_length={max_length}",
        ]
        dropped = [
            (s.dropped_empty, "no trained token left (all labels -100)"),
            (s.dropped_invalid, "invalid (skip_invalid_rows=true)"),
        ]
        for count, reason in dropped:
            if count:
                lines.append(f"  dropped: {count} rows: {reason}")
        if s.dropped_image_cut:
            lines.append(
                f"  dropped: {s.dropped_image_cut} rows: max_length would cut through an image's tokens"
            )
        if not s.dropped_empty and not s.dropped_invalid and not s.dropped_image_cut:
            lines.append("  dropped: none")
        if s.empty_reasoning_turns:
            lines.append(
                f"  reasoning: {s.empty_reasoning_turns} answer(s) without reasoning follow an empty reasoning "
                "block the template writes; the block is context, not trained (train_empty_reasoning=true "
                "trains it)"
            )
        if s.images is not None:  # an encoder that reads images
            lines.append(
                f"  images: {s.images} in the kept rows (rows below show each as its image token ×count)"
            )
        lengths = self.arrays.lengths
        if lengths.size:
            lines.append(
                f"  tokens per row: min {lengths.min()}, median {int(np.median(lengths))}, "
                f"max {lengths.max()}; trained tokens: {int(self.arrays.trained_per_row().sum())}"
            )
        if self.sources:
            lines.append("  sources:")
            lines += [f"    {line}" for line in format_sources(self.sources)]
        elif self.content is not None:
            lines.append(f"  content: {self.content.describe()}")
        if self.pack is not None:
            lines.append(f"  packing: {self.pack.summary(self.name).split(': ', 1)[1]}")
        if self.duplicates:
            lines.append(f"  duplicates: {self.duplicates} rows repeat an earlier row")
        return lines


# ---- `sftrainer data` ----------------------------------------------------------------------------


def preview_run(
    cfg: Any,
    *,
    rows: int = FIRST_ROWS,
    colour: bool = False,
    markers: tuple[str, str] = MARKERS,
    bar: str = "#",
    plot: str | None = None,
    probe: bool = False,
    show_template: bool = False,
) -> str:
    """Everything ``sftrainer data`` prints for a run config (``run_config.RunConfig``)."""
    args = cfg.train
    name = cfg.model.name_or_path
    model_path = builtin.model_path(name)
    own = load_processing_class(model_path, cfg.model.trust_remote_code, cfg.model.revision)
    tokenizer = prepare_processing_class(own, args)
    train_raw, eval_raw = resolve_data(cfg)
    pipeline = preview_pipeline(tokenizer, args)
    train_source = data_load.describe(cfg.data.train)
    train = describe_data(train_raw, tokenizer, args, "train data", train_source, cfg, pipeline)
    out = train.summary_lines(args.max_length)
    eval_rows = None
    if eval_raw is None:
        out.append("eval data: none (data.eval or data.eval_split would measure held-out loss)")
    else:
        try:
            evaluation = describe_data(
                eval_raw, tokenizer, args, "eval data", _eval_source(cfg), cfg, pipeline
            )
            out += evaluation.summary_lines(args.max_length)
            eval_rows = evaluation.stats.kept
        except DataError as err:
            if "no row has any token to train on" not in str(err) and "has no rows" not in str(err):
                raise
            out.append(f"eval data: {err}")
            eval_rows = 0

    uses_template = "chat template" in train.stats.format
    source = template_source(own.chat_template, args.chat_template, args.chat_template_path, name)
    if is_processor(own):
        source = source.replace("the tokenizer's own", "the processor's own")
    out.append(
        f"chat template: {source}"
        + ("" if uses_template else f"; not used by this format ({train.stats.format})")
    )
    if show_template:
        out.append(str(tokenizer.chat_template))

    hist = length_histogram(train.arrays.lengths)
    out.append(
        f"token lengths of the {hist.total} train rows kept (after truncation to max_length={args.max_length}):"
    )
    out.append(format_histogram(hist, bar))
    if plot:
        write_histogram_png(plot, hist, args.max_length)
        out.append(f"histogram written to {plot}")

    shown = min(rows, train.arrays.lengths.size)
    if shown:
        how = "in colour" if colour else f"between {markers[0]} and {markers[1]}"
        out.append(f"first {shown} train rows as trained (trained tokens {how}):")
    for k in range(shown):
        a, b = train.arrays.offsets[k], train.arrays.offsets[k + 1]
        ids, labels = train.arrays.ids[a:b].tolist(), train.arrays.labels[a:b].tolist()
        trained = sum(label != IGNORE_INDEX for label in labels)
        out.append(f"--- row {k + 1}: {len(ids)} tokens, {trained} trained")
        out.append(render_row(ids, labels, preview_decoder(tokenizer), colour, markers))
    if shown:
        out.append("---")

    stop_ids = stop_token_ids(text_tokenizer(tokenizer))
    sequences = train.pack.sequences if train.pack is not None else int(train.arrays.lengths.size)
    rows_per_sequence = train.stats.kept / max(1, sequences)
    baseline = preflight.memory_baseline(None if not args.use_cpu else "cpu", None, model_loaded=False)
    measured = None
    if probe:
        measured = preflight.measure_step_time(cfg, train_raw, tokenizer, rows_per_sequence)
    meta = memory_estimate.meta_model(
        model_path, cfg.model.dtype, cfg.model.trust_remote_code, peft_config_from(cfg.lora)
    )
    report = preflight.summarize(
        arrays=train.arrays,
        sequences=sequences,
        args=args,
        stats=train.stats,
        shape=memory_estimate.model_shape(meta, master_weights=True),
        stop_ids=stop_ids,
        stop_tokens=", ".join(text_tokenizer(tokenizer).convert_ids_to_tokens(stop_ids)),
        duplicates=train.duplicates,
        eval_rows=eval_rows,
        lora=None if builtin.is_builtin(name) else cfg.lora is not None,
        eager_attention=cfg.model.attn_implementation == "eager",
        probe=measured,
        time_note="not measured; --probe times a few real training steps on this machine",
        baseline=baseline,  # before the probe loads a model
    )
    out.append(report.format())
    return "\n".join(out)


def describe_data(
    raw: Any,
    tokenizer: Any,
    args: Any,
    name: str,
    source: str,
    cfg: Any,
    pipeline: DataPipeline | None = None,
) -> DataPreview:
    """Prepare one raw data set as training would, and describe it. A stream is described by its
    first ``STREAM_PREVIEW_ROWS`` rows (said in the source line)."""
    if isinstance(raw, IterableDataset):
        rows = list(raw.take(STREAM_PREVIEW_ROWS))
        if not rows:
            raise ConfigError(f"{name}: the stream has no rows")
        raw = data_load.load(rows, name)
        source = f"{source} (streamed: its first {len(rows):,} rows, not the whole stream)"
    mixture = isinstance(raw, Mixture)
    columns = [f"a mixture of {len(raw.sources)} sources"] if mixture else list(raw.column_names or [])
    mapping = {} if mixture else column_mapping(columns, cfg.data.columns, args.dataset_text_field)
    prepared, stats, pack, sources = _prepare_with_sources(raw, tokenizer, args, name, pipeline)
    images, text_field = is_processor(tokenizer), args.dataset_text_field
    uses: list[SourceUse] = []
    ignored: list[str] = []
    content: ContentCounts | None = None
    if mixture:
        source = "mixture of " + ", ".join(s.label for s in raw.sources)
        for (part, rows), part_stats in zip(raw.sample(name, args.seed), sources):
            renames = column_mapping(rows.column_names, part.columns or cfg.data.columns, text_field)
            read, unread = classify_columns(rows.column_names, renames, text_field, images)
            counts = content_of(rows, read, renames)
            uses.append(SourceUse(part.label, len(part.data), len(rows), part_stats.kept, counts, unread))
    else:
        read, ignored = classify_columns(columns, mapping, text_field, images)
        content = content_of(raw, read, mapping)
    arrays = row_arrays(prepared)
    duplicates = 0 if mixture else count_duplicates(raw)  # a mixture repeats rows by its weights
    return DataPreview(
        name, source, columns, mapping, stats, arrays, pack, duplicates, uses, ignored, content
    )


def _eval_source(cfg: Any) -> str:
    if cfg.data.eval is not None:
        return data_load.describe(cfg.data.eval)
    if cfg.data.eval_split:
        return f"{cfg.data.eval_split:g} of the train data (data.eval_split)"
    return f"split {cfg.data.eval_split_name} of the train data"
