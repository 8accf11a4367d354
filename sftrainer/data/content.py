"""Which columns of a data set are read, and what its rows hold beyond plain turns (tool schemas,
tool calls, reasoning): counted for ``sftrainer data``.

Counted on the raw rows (columns named as after ``data.columns`` renaming), over the columns the
format reads (``formats.columns_read``), so a column that is not trained (``rejected``) is not counted:

- tools: a non-empty ``tools`` column (a list of schemas, or that list as a JSON string);
- tool calls: a message with ``tool_calls``, or a ShareGPT ``function_call`` turn;
- reasoning: a message with ``reasoning_content`` / ``thinking`` / ``reasoning``, or an assistant
  turn whose text holds a ``<think>`` block (templates such as Qwen3's read it from there).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftrainer.data.formats import (
    REASONING_KEYS,
    ROLE_ALIASES,
    TOOL_CALL_ROLES,
    columns_read,
    detect_format,
)
from sftrainer.errors import DataError

THINK_OPEN = "<think>"


@dataclass
class ContentCounts:
    """Rows counted, and how many of them hold each kind of content."""

    rows: int = 0
    tools: int = 0
    tool_calls: int = 0
    reasoning: int = 0

    def __add__(self, other: ContentCounts) -> ContentCounts:
        return ContentCounts(
            self.rows + other.rows,
            self.tools + other.tools,
            self.tool_calls + other.tool_calls,
            self.reasoning + other.reasoning,
        )

    def describe(self) -> str:
        """'3 with tools, 2 with tool calls, 0 with reasoning (of 10 rows)'."""
        return (
            f"{self.tools} with tools, {self.tool_calls} with tool calls, {self.reasoning} with reasoning "
            f"(of {self.rows} rows)"
        )


def count_content(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> ContentCounts:
    """``ContentCounts`` of ``rows``, reading only ``columns``."""
    counts = ContentCounts()
    for row in rows:
        counts.rows += 1
        tools = row.get("tools") if "tools" in columns else None
        counts.tools += tools not in (None, "", [], "[]")
        messages = [m for c in columns if c != "tools" for m in _messages(row.get(c))]
        counts.tool_calls += any(_calls_a_tool(m) for m in messages)
        counts.reasoning += any(_reasons(m) for m in messages)
    return counts


def classify_columns(
    columns: list[str], mapping: dict[str, str], text_field: str | None, images: bool
) -> tuple[list[str], list[str]]:
    """(read, ignored): the ``columns`` the detected format reads (after ``mapping``), and the rest,
    by their names in the data. All read when the format cannot be told (preparing says why)."""
    renamed = [mapping.get(c, c) for c in columns]
    try:
        fmt = detect_format(renamed, "", text_field)
    except DataError:
        return list(columns), []
    read = set(columns_read(renamed, fmt, text_field, images))
    return [c for c, r in zip(columns, renamed) if r in read], [
        c for c, r in zip(columns, renamed) if r not in read
    ]


def content_of(dataset: Any, read: list[str], mapping: dict[str, str]) -> ContentCounts:
    """``ContentCounts`` of a data set's rows, over the columns it is read from."""
    rows = dataset.select_columns(read) if read else dataset  # a datasets.Dataset
    return count_content(
        ({mapping.get(k, k): v for k, v in row.items()} for row in rows), [mapping.get(c, c) for c in read]
    )


def _messages(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):  # a single turn (ShareGPT's `chosen`)
        value = [value]
    if not isinstance(value, list):
        return []
    return [m for m in value if isinstance(m, Mapping)]


def _role(message: Mapping[str, Any]) -> str:
    role = message.get("role", message.get("from"))
    return str(role).lower() if role is not None else ""


def _calls_a_tool(message: Mapping[str, Any]) -> bool:
    return message.get("tool_calls") not in (None, "", [], "[]") or _role(message) in TOOL_CALL_ROLES


def _reasons(message: Mapping[str, Any]) -> bool:
    if any(message.get(k) not in (None, "") for k in REASONING_KEYS):
        return True
    role = _role(message)
    text = message.get("content", message.get("value"))
    return ROLE_ALIASES.get(role, role) == "assistant" and isinstance(text, str) and THINK_OPEN in text
