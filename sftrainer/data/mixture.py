"""Several data sets mixed into one training set, each with its own format, columns and split, and a
weight or a row count. Deterministic by seed.

How many rows each source gives (``plan_rows``):

- neither ``weight`` nor ``rows``: all its rows, once (as a plain list of files);
- ``rows: N``: exactly N rows;
- ``weight: w``: the weighted sources together give as many rows as they hold (the sum of their
  sizes), shared in proportion to their weights: a source of weight 2 gives twice the rows of one of
  weight 1, whatever their sizes.

A source asked for at most its size gives a seeded sample without replacement; asked for more, it
gives every row ``N // size`` times plus a seeded sample of the remainder (repetition, said in the
log). Rows are drawn from the raw data before it is tokenized; each source is then prepared on its
own (format detected, ``columns`` renamed, tokenized), so a prompt/completion file and a messages
file can be mixed, and the prepared rows are concatenated in source order (then shuffled with
``shuffle_dataset``). Rows a source's preparation drops are counted in that source's statistics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset, concatenate_datasets

from sftrainer.constants import MIXTURE_REPEAT_WARNING
from sftrainer.data import load as data_load
from sftrainer.data import origin
from sftrainer.data.content import ContentCounts
from sftrainer.data.prepare import DataSettings, PrepareStats, prepare
from sftrainer.errors import ConfigError, DataError, did_you_mean

logger = logging.getLogger(__name__)

# The keys of one source in YAML (``data.train: [{path: ..., weight: 2}, ...]``).
SOURCE_KEYS = ("path", "weight", "rows", "split", "subset", "data_files", "columns")


def count_problems(weight: Any, rows: Any, where: str) -> list[str]:
    """Problems with a source's ``weight`` / ``rows``, each naming the key as ``where.weight``."""
    problems = []
    if weight is not None and rows is not None:
        problems.append(f"{where}: set weight (a share of the mix) or rows (a number of rows), not both")
    if weight is not None and (
        isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight)
    ):
        problems.append(f"{where}.weight: must be a number, got {weight!r}")
    elif weight is not None and weight <= 0:
        problems.append(
            f"{where}.weight: must be > 0, got {weight} (a relative share of the mix; "
            "remove the source to leave it out)"
        )
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int)):
        problems.append(f"{where}.rows: must be a whole number of rows, got {rows!r}")
    elif rows is not None and rows < 1:
        problems.append(f"{where}.rows: must be >= 1, got {rows} (remove the source to leave it out)")
    return problems


def spec_problems(spec: Any, where: str) -> list[str]:
    """Every problem with one YAML source (a path string, or a mapping of ``SOURCE_KEYS``)."""
    if isinstance(spec, str):
        return []
    if not isinstance(spec, Mapping):
        return [f"{where}: must be a path or a mapping with a 'path' key, got {spec!r}"]
    problems = [
        f"unknown key '{where}.{key}'{did_you_mean(str(key), SOURCE_KEYS)}; a source takes: {', '.join(SOURCE_KEYS)}"
        for key in spec
        if key not in SOURCE_KEYS
    ]
    if not isinstance(spec.get("path"), str) or not spec.get("path"):
        problems.append(f"{where}.path: missing; each source needs a path (file, directory, glob or hub id)")
    problems += count_problems(spec.get("weight"), spec.get("rows"), where)
    columns = spec.get("columns")
    if columns is not None and (
        not isinstance(columns, Mapping) or not all(isinstance(v, str) for v in columns.values())
    ):
        problems.append(f"{where}.columns: must be a mapping {{their_name: prompt}}, got {columns!r}")
    for key in ("split", "subset"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            problems.append(f"{where}.{key}: must be a string, got {spec[key]!r}")
    return problems


@dataclass(frozen=True)
class MixtureSource:
    """One data set of a mixture. ``data``: anything ``sftrainer.data.load.load`` accepts."""

    data: Any
    weight: float | None = None
    rows: int | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    split: str | None = None
    subset: str | None = None
    data_files: Any = None
    name: str = ""

    def __post_init__(self) -> None:
        problems = count_problems(self.weight, self.rows, f"source '{self.label}'")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        split = f" ({self.split})" if self.split not in (None, "train") else ""
        return data_load.describe(self.data) + split


@dataclass(frozen=True)
class Mixture:
    """Data sets mixed into one training set; pass it as ``train_dataset``. ``seed`` None: ``args.seed``."""

    sources: Sequence[MixtureSource]
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("a mixture needs at least one source")

    def loaded(self, name: str = "train data") -> Mixture:
        """The same mixture with every source loaded (a ``Dataset``): load errors surface now."""
        return replace(
            self, sources=[replace(s, data=self._load(s, name), name=s.label) for s in self.sources]
        )

    def _load(self, source: MixtureSource, name: str) -> Dataset:
        where = f"{name} [{source.label}]"
        data = data_load.load(
            source.data, where, split=source.split, subset=source.subset, data_files=source.data_files
        )
        if isinstance(data, IterableDataset):
            raise DataError(
                f"{where}: a mixture samples rows from each source, so it needs map-style data; this "
                "source is streamed. Load it without streaming, or train on it alone."
            )
        if len(data) == 0:
            raise DataError(f"{where}: has no rows; remove it from the mixture or point it at data")
        return data

    def __len__(self) -> int:
        """Rows the mix holds before preparation (``loaded()`` first: raw paths have no length)."""
        if not all(isinstance(s.data, Dataset) for s in self.sources):
            raise TypeError("the length of a mixture is known once its sources are loaded (Mixture.loaded)")
        return sum(plan_rows([len(s.data) for s in self.sources], self.sources))

    def sample(self, name: str, seed: int) -> list[tuple[MixtureSource, Dataset]]:
        """Each source loaded and cut or repeated to its planned rows (see the module docstring)."""
        seed = seed if self.seed is None else self.seed
        loaded = self.loaded(name).sources
        sizes = [len(s.data) for s in loaded]
        counts = plan_rows(sizes, loaded)
        out = []
        for k, (source, size, n) in enumerate(zip(loaded, sizes, counts)):
            indices = sample_indices(size, n, seed, k)
            sample = source.data.select(indices)
            out.append((source, origin.pass_on(sample, source.data, rows=indices.__getitem__)))
        return out


def plan_rows(sizes: Sequence[int], sources: Sequence[MixtureSource]) -> list[int]:
    """How many rows each source gives: all of them, ``rows``, or a share of the weighted total."""
    weighted = [k for k, s in enumerate(sources) if s.weight is not None]
    total = sum(sizes[k] for k in weighted)
    weights = sum(sources[k].weight for k in weighted)  # type: ignore[misc]
    counts = []
    for size, source in zip(sizes, sources):
        if source.rows is not None:
            counts.append(source.rows)
        elif source.weight is not None:
            counts.append(max(1, round(total * source.weight / weights)))
        else:
            counts.append(size)
    return counts


def sample_indices(size: int, n: int, seed: int, index: int) -> list[int]:
    """``n`` row indices of a source of ``size`` rows, seeded by (seed, the source's position).

    Without replacement up to ``size``; beyond it every row ``n // size`` times plus a sample of
    the remainder. Kept in file order (the trainer shuffles the mix).
    """
    rng = np.random.default_rng([seed, index])
    whole, rest = divmod(n, size)
    picked = np.sort(rng.choice(size, rest, replace=False)) if rest else np.array([], dtype=np.int64)
    return sorted([*range(size)] * whole + picked.tolist())


def describe_plan(name: str, seed: int, parts: Sequence[tuple[MixtureSource, int, int]]) -> str:
    """One log line: each source's rows drawn of its size, with weight and repetition."""
    total = sum(n for _, _, n in parts) or 1
    items = []
    for source, size, n in parts:
        how = (
            f"weight {source.weight:g}"
            if source.weight is not None
            else (f"rows {source.rows}" if source.rows is not None else "all rows")
        )
        repeat = f", each row ~{n / size:.1f}x" if n > size else ""
        items.append(f"{source.label}: {n} of {size} rows ({how}, {100 * n / total:.1f}% of the mix{repeat})")
    return f"{name}: mixture of {len(parts)} sources, seed {seed}: " + "; ".join(items)


@dataclass
class SourceUse:
    """What a mixture made of one source, for ``sftrainer data``: the rows it holds, the rows the mix
    drew from it (fewer: a sample; more: repeated), the rows kept after preparation, and what the
    drawn rows hold (tools, tool calls, reasoning); ``ignored``: its columns that are not read."""

    label: str
    rows_in: int
    drawn: int
    used: int
    content: ContentCounts
    ignored: Sequence[str] = ()

    def sampling(self) -> str:
        if self.drawn < self.rows_in:
            how = f"{self.rows_in - self.drawn} dropped (a sample of {self.drawn})"
        elif self.drawn > self.rows_in:
            how = f"repeated, each row ~{self.drawn / self.rows_in:.1f}x"
        else:
            how = "all, once"
        lost = self.drawn - self.used
        return how + (f"; {lost} dropped in preparation" if lost > 0 else "")


def format_sources(uses: Sequence[SourceUse]) -> list[str]:
    """A text table of a mixture's sources, one line each and a total."""
    header = ("source", "rows in", "rows used", "dropped / repeated", "tools", "tool calls", "reasoning")
    rows = [
        (u.label, u.rows_in, u.used, u.sampling(), u.content.tools, u.content.tool_calls, u.content.reasoning)
        for u in uses
    ]
    total = ContentCounts()
    for u in uses:
        total += u.content
    rows.append(
        ("total", sum(u.rows_in for u in uses), sum(u.used for u in uses), "", total.tools,
         total.tool_calls, total.reasoning)
    )  # fmt: skip
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    numeric = [isinstance(c, int) for c in rows[0]]
    lines = [
        "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()
        for row in cells
    ]
    return lines + [f"{u.label}: ignored (not read): {', '.join(u.ignored)}" for u in uses if u.ignored]


def prepare_mixture(
    mixture: Mixture,
    tokenizer: Any,
    settings: DataSettings,
    name: str = "train data",
    seed: int = 42,
    formatting_func: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[Dataset, PrepareStats, list[PrepareStats]]:
    """``prepare`` for a mixture: each source sampled (``seed``, unless the mixture has its own),
    then prepared with its own format and ``columns``; the rows concatenated in source order.

    Returns the rows, their summed counts (``format`` lists each source's), and each source's counts
    (named ``"<name> [<source>]"``). Logs the rows drawn per source, and warns about a weight that
    repeats a source ``MIXTURE_REPEAT_WARNING`` times or more.
    """
    seed = seed if mixture.seed is None else mixture.seed
    parts: list[Dataset] = []
    plan: list[tuple[MixtureSource, int, int]] = []
    per_source: list[PrepareStats] = []
    total = PrepareStats(name=name, format="mixture")
    counted = (
        "rows",
        "kept",
        "truncated",
        "dropped_empty",
        "dropped_invalid",
        "rewritten_turns",
        "same_role_rows",
        "split_rows",
        "inexact_rows",
        "empty_reasoning_turns",
    )
    for k, (source, rows) in enumerate(mixture.sample(name, seed)):
        part_name = f"{name} [{source.label}]"
        if any(s.name == part_name for s in per_source):  # the same file twice (other columns or split)
            part_name = f"{name} [{k + 1}: {source.label}]"
        part_settings = replace(settings, columns=source.columns or settings.columns)
        prepared, stats = prepare(rows, tokenizer, part_settings, part_name, formatting_func)
        parts.append(prepared)
        per_source.append(stats)
        plan.append((source, len(source.data), len(rows)))
        for key in counted:
            setattr(total, key, getattr(total, key) + getattr(stats, key))
    total.format = "mixture: " + "; ".join(s.format for s in per_source)
    logger.info(describe_plan(name, seed, plan))
    for source, size, n in plan:
        if source.weight is not None and n >= MIXTURE_REPEAT_WARNING * size:
            logger.warning(
                "%s: its weight repeats every row of %s about %.0f times (%d rows drawn from %d); "
                "weights share the weighted sources' total size, so a small source weighted like a "
                "large one is repeated. Give it rows: N, or a smaller weight, if that is not meant.",
                name,
                source.label,
                n / size,
                n,
                size,
            )
    features = parts[0].features
    rows = concatenate_datasets([p.cast(features) if p.features != features else p for p in parts])
    return rows, total, per_source
