"""How a data set's preparation runs: in how many processes (``auto_num_proc``, ``shared_heap``), and
under which ``datasets`` cache key (``cache_key``: the data, what decides the rows, and the code that
prepares them, so a cache written by other sftrainer code is never reused).

Contract: pure functions of their arguments and of sftrainer's source files; ``data.prepare`` calls
them around its one ``Dataset.map``.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import inspect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset
from datasets.fingerprint import Hasher

from sftrainer.constants import ROWS_PER_PREPARE_PROCESS
from sftrainer.version import __version__


@contextlib.contextmanager
def shared_heap(num_proc: int | None) -> Iterator[None]:
    """While worker processes are forked and run (``num_proc`` > 1), leave the objects that exist
    before them out of garbage collection (``gc.freeze``, what Python advises before ``fork()``).
    Otherwise each collection in a worker walks every object it inherited (all of torch and
    transformers), and writing to them makes the worker copy those memory pages: about a tenth of
    the preparation time. Unfrozen afterwards; nothing is done where objects are already frozen
    (the caller's own freeze is left as it is)."""
    if not num_proc or num_proc <= 1 or gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def auto_num_proc(rows: int) -> int:
    """Processes for ``dataset_num_proc`` unset: one per ``ROWS_PER_PREPARE_PROCESS`` rows, at most
    one per CPU core this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, rows // ROWS_PER_PREPARE_PROCESS))


@functools.cache
def _code_version() -> str:
    """A hash of this package's data code: datasets fingerprints a map by the function object, not the
    code of the helpers it calls, so without it a cache written by an older sftrainer is reused."""
    return _hash_folder(Path(__file__).parent)


@functools.cache
def _hash_folder(folder: Path) -> str:
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _strategy_code(parts: list[Any]) -> list[str]:
    """The code of the parts' own sftrainer packages outside ``data/`` (the vision encoder's folder),
    hashed as ``_code_version`` hashes ``data/``."""
    here = Path(__file__).parent
    folders = {
        Path(inspect.getfile(type(part))).parent
        for part in parts
        if type(part).__module__.startswith("sftrainer.")
    }
    return [_hash_folder(folder) for folder in sorted(folders - {here})]


def cache_key(dataset: Dataset, parts: list[Any], columns: list[str]) -> str | None:
    """A prepared data set's cache key: the data, what decides the rows (``parts``: the settings that
    change them, the encoder with its tokenizer / processor and template, the format, a formatting_func)
    and the code that prepares them. None (datasets decides) if a part cannot be hashed (an unpicklable
    formatting_func)."""
    try:
        code = [_code_version(), *_strategy_code(parts)]
        return Hasher.hash([dataset._fingerprint, parts, columns, code])
    except Exception:
        return None
