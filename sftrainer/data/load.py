"""Load training data from files, Hugging Face datasets or Python lists into a ``datasets`` object.

Every failure names the source: a broken JSONL line gives ``file:line``, a missing file its path.
What is read is remembered (``sftrainer.data.origin``), so later messages about the rows name it too.
"""

from __future__ import annotations

import csv
import glob
import inspect
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import datasets
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

from sftrainer.data import origin
from sftrainer.data.formats import rename_columns
from sftrainer.errors import DataError

logger = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
AnyDataset: TypeAlias = Dataset | IterableDataset
# datasets >= 4.7 can hold a column of mixed types as JSON; older versions refuse such a list.
_MIXED_TYPES = (
    {"on_mixed_types": "use_json"}
    if "on_mixed_types" in inspect.signature(Dataset.from_dict).parameters
    else {}
)


def describe(source: Any) -> str:
    """A short name for a data source, used in messages."""
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, list | tuple) and source and all(isinstance(s, str | os.PathLike) for s in source):
        return ", ".join(map(str, source))
    if isinstance(source, list):
        return "the list of rows"
    return type(source).__name__


def load(
    source: Any,
    name: str = "train data",
    *,
    split: str | None = None,
    subset: str | None = None,
    data_files: str | Sequence[str] | Mapping[str, Any] | None = None,
    revision: str | None = None,
    streaming: bool = False,
) -> AnyDataset:
    """Return a ``Dataset`` (or ``IterableDataset``) for any accepted source.

    Accepted: ``Dataset``, ``IterableDataset``, a list of dicts, or path(s) to .json/.jsonl/.csv/
    .parquet files (directories and globs expand to the supported files in them). A string that is
    not a local path is tried as a Hugging Face dataset id (``org/name``, dots allowed).

    ``split`` (default 'train'; slices such as 'train[:1000]' work), ``subset`` (the dataset's
    configuration, ``name`` of ``datasets.load_dataset``) and ``data_files`` are passed to
    ``datasets.load_dataset`` for a hub id. A local directory given any of them is loaded the same
    way (a dataset folder with its own splits), instead of as the set of files in it. ``revision``
    (a branch, tag or commit) applies to a hub id. ``streaming`` returns an ``IterableDataset`` read
    as training goes (files are then not checked up front: a broken line is reported when reached).
    """
    if isinstance(source, Dataset | IterableDataset):
        return source
    if isinstance(source, DatasetDict | IterableDatasetDict):
        raise DataError(f"{name}: pass one split of the DatasetDict (splits: {list(source)})")
    if isinstance(source, list) and (not source or not isinstance(source[0], str | os.PathLike)):
        return _from_rows(source, name)
    hub_args = {"split": split, "name": subset, "data_files": data_files, "revision": revision}
    if isinstance(source, str | os.PathLike):
        path = str(source)
        if os.path.isdir(path) and any(v is not None for v in hub_args.values()):
            return _from_hub(path, name, {**hub_args, "streaming": streaming or None})
        if not os.path.exists(path) and is_hub_id(path):
            return _from_hub(path, name, {**hub_args, "streaming": streaming or None})
    if isinstance(source, str | os.PathLike | list | tuple):
        given = [k for k, v in (("subset", subset), ("data_files", data_files), ("revision", revision)) if v]
        if given:
            raise DataError(
                f"{name}: {' and '.join(given)} (given) only apply to a Hugging Face dataset or a dataset "
                f"directory, not to files ({describe(source)})"
            )
        files = expand_files(source, name)
        loaded = _from_files(files, name, split or "train", streaming)
        return origin.remember(loaded, origin.Origin(describe(source), tuple(files)))
    raise DataError(
        f"{name}: cannot load a {type(source).__name__}. Pass a list of dicts, a datasets.Dataset, "
        "or path(s) to .json, .jsonl, .csv or .parquet files."
    )


# Suffixes that make a missing path a missing file rather than a hub id (`teknium/OpenHermes-2.5`
# is a hub id with a dot in it).
_FILE_SUFFIXES = {*BUILDERS, ".txt", ".tsv", ".arrow", ".gz", ".zip", ".zst", ".xz", ".bz2", ".yaml", ".yml"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def is_hub_id(text: str) -> bool:
    """'name' or 'org/name' without a data-file suffix: can only be a Hugging Face dataset id."""
    return bool(_HUB_ID.fullmatch(text)) and Path(text).suffix.lower() not in _FILE_SUFFIXES


def resolved_from(path: str) -> str:
    """For a relative path: where it was looked for, and why there (every relative data path, one in
    a YAML file too, is read from the current directory, not from the YAML file's directory)."""
    if os.path.isabs(path):
        return ""
    return (
        f" (a relative path, looked for in the current directory {os.getcwd()}: {os.path.abspath(path)}; "
        "relative data paths, also those in a YAML file, are read from the current directory, not the "
        "YAML file's directory)"
    )


def _from_rows(rows: list[Any], name: str) -> Dataset:
    if not rows:
        raise DataError(f"{name}: the list of rows is empty")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{name}: row {i + 1} is a {type(row).__name__}, expected a dict of columns")
    # Columns from every row (Dataset.from_list reads only the first row's keys), and a column whose
    # rows hold different types (a number among strings) kept as JSON, so the row-level checks name
    # the row and field at fault, and skip_invalid_rows can drop it.
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return Dataset.from_dict({c: [row.get(c) for row in rows] for c in columns}, **_MIXED_TYPES)
    except Exception as err:
        raise DataError(f"{name}: rows do not share one schema: {_root_message(err)}") from None


def expand_files(source: str | os.PathLike | Sequence[str | os.PathLike], name: str) -> list[str]:
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    files: list[str] = []
    for item in items:
        path = str(item)
        if os.path.isdir(path):
            found = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in BUILDERS)
            if not found:
                raise DataError(f"{name}: directory {path} has no {', '.join(BUILDERS)} files")
            files += found
        elif any(ch in path for ch in "*?["):
            found = sorted(glob.glob(path, recursive=True))
            if not found:
                raise DataError(f"{name}: no file matches {path}{resolved_from(path)}")
            files += found
        else:
            files.append(path)
    return files


def _from_files(files: list[str], name: str, split: str = "train", streaming: bool = False) -> AnyDataset:
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise DataError(f"{name}: file not found: {missing[0]}{resolved_from(missing[0])}")
    bad = next((f for f in files if Path(f).suffix.lower() not in BUILDERS), None)
    if bad is not None:
        raise DataError(f"{name}: {bad}: unsupported file type; use {', '.join(BUILDERS)}")
    kinds = {BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(kinds) > 1:
        raise DataError(f"{name}: mixes file types {sorted(kinds)}; use one type per data set")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{name}: {f} is empty")
    builder = kinds.pop()
    if streaming:  # read as training goes; guard_stream names the file if a line breaks midway
        return datasets.load_dataset(builder, data_files=files, split=split, streaming=True)
    if builder == "csv":  # a header naming a column twice loads, renamed: checked first
        for f in files:
            check_csv_header(f)
    try:
        ds, failure = datasets.load_dataset(builder, data_files=files, split=split), None
        # pyarrow's readers take invalid UTF-8 into string columns; reading them would fail later.
        ds.data.table.validate(full=True)
    except Exception as err:
        ds, failure = None, err
    if failure is not None:
        # The files are parsed once, by datasets (and then read from its cache); only when that
        # fails are they read line by line, for a message naming the file and line at fault.
        checker = {"json": check_json_file, "csv": check_csv_file}.get(builder)
        if checker is not None:
            for f in files:
                checker(f)
        if "corresponds to no data" in str(failure):  # datasets' words for zero rows (a CSV header only)
            raise DataError(f"{name}: {', '.join(files)} has no rows") from None
        raise DataError(f"{name}: could not read {', '.join(files)}: {_root_message(failure)}") from None
    if len(ds) == 0:
        raise DataError(f"{name}: {', '.join(files)} has no rows")
    return ds


def _utf8_error(path: str, data: bytes, err: UnicodeDecodeError, first_line: int = 1) -> DataError:
    line = first_line + data.count(b"\n", 0, err.start)
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(
        f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x} at column {column}). "
        "Save the file as UTF-8 (for example `iconv -f latin1 -t utf-8 in > out`)."
    )


def _text_lines(path: str):
    """(line number, text) of each line, raising ``DataError`` at the first one that is not UTF-8."""
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _utf8_error(path, raw, err, lineno) from None


def check_json_file(path: str) -> None:
    """Raise ``DataError`` with the line number of the first malformed line of a JSON/JSONL file.

    Reads the file once as text; on a well-formed file this is cheap next to tokenization.
    """
    with open(path, "rb") as fh:
        head = fh.read(1 << 16).lstrip()
    if head.startswith(b"["):  # one JSON array
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _utf8_error(path, data, err) from None
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}: item {i + 1} of the array is a {type(row).__name__}, expected an object"
                )
        if not rows:
            raise DataError(f"{path}: the JSON array is empty")
        return
    rows = 0
    for lineno, line in _text_lines(path):
        if not line.strip():
            continue
        rows += 1
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno}). "
                "Each line of a .jsonl file must be one JSON object."
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
    if not rows:
        raise DataError(f"{path}: has no rows (only blank lines)")


def check_csv_header(path: str) -> None:
    """``check_csv_file`` for the header line only (columns named twice or not at all)."""
    reader = csv.reader(line for _, line in _text_lines(path))
    for fields in reader:
        if any(f.strip() for f in fields):
            _check_csv_header(path, reader.line_num, fields)
            return


def check_csv_file(path: str) -> None:
    """Raise ``DataError`` for a CSV file that is not UTF-8, whose header names a column twice or
    not at all (the CSV reader would rename such columns to 'response.1' / 'Unnamed: 2', and their
    values would go unread), or with a row of more fields than the header."""
    reader = csv.reader(line for _, line in _text_lines(path))
    header: list[str] | None = None
    for fields in reader:
        if header is None:
            if not any(f.strip() for f in fields):
                continue
            header = fields
            _check_csv_header(path, reader.line_num, header)
        elif len(fields) > len(header):
            raise DataError(
                f"{path}:{reader.line_num}: {len(fields)} fields, but the header names {len(header)} "
                f'({", ".join(header)}). Quote values that hold a comma ("a, b"), or add the column '
                "to the header."
            )


def _check_csv_header(path: str, lineno: int, header: list[str]) -> None:
    for k, column in enumerate(header, start=1):
        if not column.strip():
            raise DataError(
                f"{path}:{lineno}: column {k} of the header has no name (header: {header}). "
                "The first line of a CSV file names every column: name it, or remove the column."
            )
        if header.index(column) != k - 1:
            raise DataError(
                f"{path}:{lineno}: the header names column '{column}' twice (columns "
                f"{header.index(column) + 1} and {k}); one of them would be read as "
                f"'{column}.1' and not trained. Rename or remove one."
            )


def guard_stream(dataset: IterableDataset, name: str) -> IterableDataset:
    """The same stream, but a failure while reading it (a broken line halfway through a file, a lost
    connection) raises ``DataError`` naming the source, the rows read before it, and what to do.

    A stream is read during training, so such a failure surfaces only when the run reaches it. The
    source's shards stay separate shards (DataLoader workers and ranks still split them).
    """
    files = _stream_files(dataset)
    n = max(1, dataset.num_shards)
    shards = [dataset.shard(n, i) for i in range(n)] if n > 1 else [dataset]
    return IterableDataset.from_generator(
        _guarded_rows,
        features=dataset.features,
        gen_kwargs={"shards": shards, "name": name, "files": tuple(files)},  # a list would be sharded
    )


def _guarded_rows(shards: list[IterableDataset], name: str, files: tuple[str, ...]):
    read = 0
    for shard in shards:
        rows = iter(shard)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                break
            except DataError:
                raise
            except Exception as err:
                where = f" (files: {', '.join(files)})" if files else ""
                raise DataError(
                    f"{name}{where}: reading the streamed data failed after {read} rows: "
                    f"{_root_message(err)}. A streamed data set is read while training, so a broken line "
                    "or a lost connection is found only when it is reached: fix or download the file "
                    "again, and check it up front by loading it without streaming (a local file given "
                    "by path is checked line by line)."
                ) from None
            read += 1
            yield row


def _stream_files(dataset: IterableDataset) -> list[str]:
    """The files a streamed ``load_dataset`` reads, where datasets exposes them; [] otherwise.

    Best effort: datasets (5.x) keeps them in the ``base_files`` argument of its innermost example
    iterable, which is not public API, so any surprise gives [] and the message names the data set only.
    """
    try:
        it: Any = dataset._ex_iterable
        for _ in range(32):
            files = (getattr(it, "kwargs", None) or {}).get("base_files")
            if files:
                return [str(f) for f in files][:5]
            it = getattr(it, "ex_iterable", None)
            if it is None:
                break
    except Exception:
        pass
    return []


def _from_hub(dataset_id: str, name: str, hub_args: Mapping[str, Any]) -> AnyDataset:
    kwargs = {k: v for k, v in hub_args.items() if v is not None}
    kwargs.setdefault("split", "train")
    where = (
        "a local dataset directory"
        if os.path.isdir(dataset_id)
        else f"not a local file or directory{resolved_from(dataset_id)}"
    )
    try:
        ds = datasets.load_dataset(dataset_id, **kwargs)
    except Exception as err:
        raise DataError(
            f"{name}: '{dataset_id}' is {where}, and loading it as a Hugging Face dataset "
            f"({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed: {_root_message(err)}"
        ) from None
    return origin.remember(ds, origin.Origin(dataset_id))


def rename(dataset: AnyDataset, mapping: Mapping[str, str], name: str) -> AnyDataset:
    """Apply a ``{their_column: our_column}`` mapping (YAML ``data.columns``), checked first."""
    columns = dataset.column_names or list(next(iter(dataset)))
    return origin.pass_on(dataset.rename_columns(rename_columns(columns, mapping, name)), dataset)


def split_dataset_dict(source: Any) -> tuple[Any, Any]:
    """(train, eval) from a DatasetDict: 'train' and the first of 'test'/'validation'/'eval'."""
    if "train" not in source:
        raise DataError(f"the DatasetDict has no 'train' split (splits: {list(source)})")
    eval_split = next((source[k] for k in ("test", "validation", "eval") if k in source), None)
    return source["train"], eval_split


def train_eval_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if not isinstance(ds, Dataset):
        raise DataError("eval_split needs a map-style dataset; pass eval data for an IterableDataset")
    if len(ds) < 2:
        raise DataError(f"eval_split={fraction} needs at least 2 rows, the data has {len(ds)}")
    parts = ds.train_test_split(test_size=fraction, seed=seed)
    train, test = parts["train"], parts["test"]
    rows = origin.selected_rows(train, ds), origin.selected_rows(test, ds)
    return (
        origin.pass_on(train, ds, rows=rows[0], known=rows[0] is not None),
        origin.pass_on(test, ds, rows=rows[1], known=rows[1] is not None),
    )


def _root_message(err: BaseException) -> str:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return f"{type(err).__name__}: {err}"
