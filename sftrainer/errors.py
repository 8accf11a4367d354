"""Errors that sftrainer raises for problems the user can fix.

Each message says where the problem is (file, row, key) and what to do about it. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class SFTrainerError(ValueError):
    """Base class for user-facing errors (bad config, bad data, impossible settings)."""


class ConfigError(SFTrainerError):
    """A configuration key or value is wrong. The message lists every problem found."""


class DataError(SFTrainerError):
    """The training or evaluation data cannot be used as given."""


class RowError(DataError):
    """A problem with one row; ``field`` names the column (and message index) at fault.

    The message names the field only: whoever knows the row number and source adds them.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


class TemplateError(RowError):
    """The chat template renders a conversation so that an assistant turn cannot be located."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name``, or None when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = closest(name, choices)
    return f" (did you mean '{close}'?)" if close else ""


class RunDirError(SFTrainerError):
    """A run directory (or merge output directory) cannot be used as given."""


class NonFiniteLossError(SFTrainerError):
    """The training loss became NaN or infinite; training stopped before applying it."""


class ContaminationError(SFTrainerError):
    """Rows of a packed / padding-free batch would see each other with this model and backend."""


def warn_caller(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the caller's line: the first frame outside sftrainer, transformers
    and dataclass-generated ``__init__`` code, however deep the call (``SFTConfig(...)``, a
    ``TrainingArguments`` converted inside ``SFTTrainer(...)``, a subclass's ``__post_init__``).
    Python 3.12's ``skip_file_prefixes`` does this; 3.11 has only ``stacklevel``, so it is counted here.
    """
    frame, level = sys._getframe(1), 2  # stacklevel 2: whoever called this function
    while frame.f_back is not None and _is_internal(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def _is_internal(filename: str) -> bool:
    if filename == "<string>":  # the __init__ that @dataclass generates (TrainingArguments, SFTConfig)
        return True
    path = os.path.abspath(filename)
    if path.startswith(PACKAGE_DIR):
        return True
    transformers = sys.modules.get("transformers")
    root = getattr(transformers, "__file__", None)
    return root is not None and path.startswith(os.path.dirname(os.path.abspath(root)) + os.sep)
