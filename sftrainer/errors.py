"""Errors that sftrainer raises for problems the user can fix.

Each message says where the problem is (file, row, key) and what to do about it. The CLI prints
these without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SFTrainerError(ValueError):
    """Base class for user-facing errors (bad config, bad data, impossible settings)."""


class ConfigError(SFTrainerError):
    """A configuration key or value is wrong. The message lists every problem found."""


class DataError(SFTrainerError):
    """The training or evaluation data cannot be used as given."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
