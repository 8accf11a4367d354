"""Detect a data set's format from its columns and normalise rows into examples. Pure functions.

A row becomes one of three examples:

- ``TextExample``: plain text; every token is trained.
- ``PairExample``: a prompt and a completion rendered as raw text (``prompt + completion + EOS``);
  the completion and EOS are trained. TRL's "prompt/completion" semantics.
- ``ChatExample``: a conversation rendered with the tokenizer's chat template; assistant turns are
  trained. Prompt/response and Alpaca rows become a one-turn conversation when the pair template is
  ``chat`` (the default for them), so an instruct model sees the format it will be prompted with.

Problems with a row raise ``RowError`` naming the field; the caller adds the row number and source.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sftrainer.errors import DataError, RowError, did_you_mean


class Format(str, Enum):
    TOKENIZED = "tokenized"
    MESSAGES = "messages"
    SHAREGPT = "sharegpt"
    ALPACA = "alpaca"
    PROMPT_COMPLETION = "prompt_completion"
    PROMPT_RESPONSE = "prompt_response"
    TEXT = "text"


# Detection order matters: the first format whose required columns are all present wins.
REQUIRED_COLUMNS: dict[Format, tuple[str, ...]] = {
    Format.TOKENIZED: ("input_ids",),
    Format.MESSAGES: ("messages",),
    Format.SHAREGPT: ("conversations",),
    Format.ALPACA: ("instruction", "output"),
    Format.PROMPT_COMPLETION: ("prompt", "completion"),
    Format.PROMPT_RESPONSE: ("prompt", "response"),
    Format.TEXT: ("text",),
}
OPTIONAL_COLUMNS: dict[Format, tuple[str, ...]] = {
    Format.TOKENIZED: ("labels", "attention_mask", "completion_mask", "assistant_masks"),
    Format.ALPACA: ("input", "system"),
    Format.PROMPT_COMPLETION: ("system",),
    Format.PROMPT_RESPONSE: ("system",),
}
KNOWN_COLUMNS = sorted({c for cols in (*REQUIRED_COLUMNS.values(), *OPTIONAL_COLUMNS.values()) for c in cols})

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT speakers and other common spellings, mapped to chat-template roles.
ROLE_ALIASES = {
    "human": "user",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
    "function": "tool",
    "observation": "tool",
    "ipython": "tool",
}


@dataclass(frozen=True)
class TextExample:
    text: str


@dataclass(frozen=True)
class PairExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    messages: list[dict[str, str]]
    # Assistant turns before this index are context, never trained (conversational prompt/completion).
    first_trainable: int = 0
    tools: list[dict[str, Any]] | None = field(default=None, compare=False)


Example = TextExample | PairExample | ChatExample


def format_help() -> str:
    lines = [f"  {fmt.value}: {', '.join(cols)}" for fmt, cols in REQUIRED_COLUMNS.items()]
    return "Known formats (required columns):\n" + "\n".join(lines)


def detect_format(columns: Sequence[str], source: str, text_field: str | None = None) -> Format:
    """Pick the format from the column names; ``text_field`` (TRL's ``dataset_text_field``) wins.

    ``dataset_text_field="prompt"`` on prompt/response rows means "format prompt + response" (the
    older TRL idiom), so that case is a pair format, not text, and the response is what is trained.
    """
    columns = list(columns)
    if text_field is not None:
        if text_field not in columns:
            raise DataError(
                f"{source}: dataset_text_field='{text_field}' is not a column{did_you_mean(text_field, columns)}. "
                f"Columns found: {columns}."
            )
        if text_field == "prompt" and "completion" in columns:
            return Format.PROMPT_COMPLETION
        if text_field == "prompt" and "response" in columns:
            return Format.PROMPT_RESPONSE
        return Format.TEXT
    for fmt, required in REQUIRED_COLUMNS.items():
        if all(c in columns for c in required):
            return fmt
    hints = [
        f"'{c}'{did_you_mean(c, KNOWN_COLUMNS)}"
        for c in columns
        if c not in KNOWN_COLUMNS and did_you_mean(c, KNOWN_COLUMNS)
    ]
    hint = f" Possibly misspelled: {', '.join(hints)}." if hints else ""
    raise DataError(
        f"{source}: cannot tell the data format from the columns {columns}.{hint}\n{format_help()}\n"
        "Rename columns with data.columns (YAML, e.g. `columns: {question: prompt, answer: response}`), "
        "or pass dataset_text_field= or formatting_func=."
    )


def _as_text(value: Any, field_name: str, *, allow_empty: bool = True) -> str:
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)  # content given as text parts
    if value is None:
        raise RowError(field_name, "is missing (null)")
    if not isinstance(value, str):
        raise RowError(field_name, f"must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    if not allow_empty and not value.strip():
        raise RowError(field_name, "is empty; every response must have text to train on")
    return value


def normalise_messages(
    messages: Any, field_name: str, role_key: str = "role", content_key: str = "content"
) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(field_name, "must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        where = f"{field_name}[{i}]"
        if not isinstance(message, Mapping):
            raise RowError(where, f"must be an object with '{role_key}' and '{content_key}'")
        raw_role = message.get(role_key)
        if not isinstance(raw_role, str):
            raise RowError(f"{where}.{role_key}", f"must be a string, got {raw_role!r}")
        role = ROLE_ALIASES.get(raw_role.lower(), raw_role.lower())
        if role not in ROLES:
            raise RowError(
                f"{where}.{role_key}",
                f"unknown role '{raw_role}'{did_you_mean(raw_role, ROLES)}; known roles: {', '.join(ROLES)} "
                f"(also accepted: {', '.join(ROLE_ALIASES)})",
            )
        content = _as_text(
            message.get(content_key), f"{where}.{content_key}", allow_empty=role != "assistant"
        )
        out.append({"role": role, "content": content})
    return out


def _with_system(row: Mapping[str, Any], turns: list[dict[str, str]]) -> list[dict[str, str]]:
    system = row.get("system")
    if system is None or system == "":
        return turns
    return [{"role": "system", "content": _as_text(system, "system")}, *turns]


def normalise_row(row: Mapping[str, Any], fmt: Format, text_field: str | None, pair_as_chat: bool) -> Example:
    """Turn one row of a known format into an example. Raises ``RowError``."""
    if fmt is Format.TEXT:
        name = text_field or "text"
        return TextExample(_as_text(row.get(name), name, allow_empty=False))
    if fmt is Format.MESSAGES:
        return ChatExample(normalise_messages(row.get("messages"), "messages"), tools=row.get("tools"))
    if fmt is Format.SHAREGPT:
        return ChatExample(normalise_messages(row.get("conversations"), "conversations", "from", "value"))
    if fmt is Format.ALPACA:
        instruction = _as_text(row.get("instruction"), "instruction")
        extra = row.get("input")
        prompt = instruction if extra in (None, "") else f"{instruction}\n\n{_as_text(extra, 'input')}"
        return _pair(row, prompt, _as_text(row.get("output"), "output", allow_empty=False), pair_as_chat)
    if fmt in (Format.PROMPT_COMPLETION, Format.PROMPT_RESPONSE):
        answer_field = "completion" if fmt is Format.PROMPT_COMPLETION else "response"
        prompt, answer = row.get("prompt"), row.get(answer_field)
        if isinstance(prompt, list) and isinstance(answer, list):  # conversational prompt/completion
            context = normalise_messages(prompt, "prompt")
            return ChatExample(
                context + normalise_messages(answer, answer_field), first_trainable=len(context)
            )
        prompt_text = _as_text(prompt, "prompt")
        return _pair(row, prompt_text, _as_text(answer, answer_field, allow_empty=False), pair_as_chat)
    raise AssertionError(f"normalise_row does not handle {fmt}")  # tokenized rows never get here


def _pair(row: Mapping[str, Any], prompt: str, answer: str, as_chat: bool) -> Example:
    if as_chat:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return ChatExample(_with_system(row, turns))
    return PairExample(prompt, answer)


def rename_columns(columns: Iterable[str], mapping: Mapping[str, str], source: str) -> dict[str, str]:
    """Validate a user's ``{their_column: our_column}`` mapping against the columns present."""
    columns = list(columns)
    missing = [c for c in mapping if c not in columns]
    if missing:
        raise DataError(
            f"{source}: data.columns maps {missing} but the data has no such column"
            f"{did_you_mean(missing[0], columns)}. Columns found: {columns}."
        )
    unknown = [t for t in mapping.values() if t not in KNOWN_COLUMNS]
    if unknown:
        raise DataError(
            f"data.columns maps to {unknown}, which sftrainer does not read"
            f"{did_you_mean(unknown[0], KNOWN_COLUMNS)}. Target names: {KNOWN_COLUMNS}."
        )
    return dict(mapping)
