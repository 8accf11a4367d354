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

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sftrainer.constants import IMAGE_COLUMNS
from sftrainer.errors import DataError, RowError, closest, did_you_mean


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
CHAT_COLUMNS = ("tools", "chat_template_kwargs")  # read with every format rendered by a chat template
OPTIONAL_COLUMNS: dict[Format, tuple[str, ...]] = {
    Format.TOKENIZED: ("labels", "attention_mask", "completion_mask", "assistant_masks"),
    Format.MESSAGES: CHAT_COLUMNS,
    Format.SHAREGPT: ("system", "chosen", *CHAT_COLUMNS),
    Format.ALPACA: ("input", "system", *CHAT_COLUMNS),
    Format.PROMPT_COMPLETION: ("system", *CHAT_COLUMNS),
    Format.PROMPT_RESPONSE: ("system", *CHAT_COLUMNS),
}
# The image columns of vision-language rows (sftrainer.vision.images) are known too: data.columns may map to them.
KNOWN_COLUMNS = sorted(
    {c for cols in (*REQUIRED_COLUMNS.values(), *OPTIONAL_COLUMNS.values()) for c in cols}
    | set(IMAGE_COLUMNS)
)

# Layouts public data sets use, read as one of the formats above when no format's columns are all
# present: (columns that must all be there, {their column: ours}). The first that fits wins.
COLUMN_LAYOUTS: list[tuple[tuple[str, ...], dict[str, str]]] = [
    # databricks-dolly-15k
    (("instruction", "context", "response"), {"context": "input", "response": "output"}),
    (("instruction", "response"), {"response": "output"}),
    (("prompt", "answer"), {"answer": "response"}),
    (("question", "answer"), {"question": "prompt", "answer": "response"}),
    (("query", "response"), {"query": "prompt"}),
    (("input", "output"), {"input": "prompt", "output": "response"}),
    # preference data: the chosen answer is trained, `rejected` is not read
    (("prompt", "chosen"), {"chosen": "completion"}),
]

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
    "function_call": "assistant",  # LLaMA-Factory's ShareGPT: the value is the call as JSON
}
TOOL_CALL_ROLES = ("function_call",)
# Keys a message may carry beside role and content, passed to the chat template as given.
MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")
# Spellings of an assistant turn's reasoning, kept as `reasoning_content` (transformers gives it
# to templates under the other names too: gpt-oss reads `thinking`).
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class TextExample:
    text: str


@dataclass(frozen=True)
class PairExample:
    prompt: str
    completion: str


@dataclass(frozen=True)
class ChatExample:
    messages: list[dict[str, Any]]
    # Assistant turns before this index are context, never trained (conversational prompt/completion).
    first_trainable: int = 0
    tools: list[dict[str, Any]] | None = field(default=None, compare=False)
    # Extra variables for the chat template (e.g. enable_thinking), from the row or the config.
    template_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)


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
    misspelled = {c: closest(c, KNOWN_COLUMNS) for c in columns if c not in KNOWN_COLUMNS}
    misspelled = {c: known for c, known in misspelled.items() if known}
    hint = ", ".join(f"'{c}' (did you mean '{known}'?)" for c, known in misspelled.items())
    hint = f" Possibly misspelled: {hint}." if hint else ""
    example = dict(misspelled)
    if any(_looks_like_data(c) for c in columns):
        hint += (
            " The column names look like data: a CSV file's first line must be a header naming the "
            "columns (e.g. prompt,response)."
        )
        example = {}
    elif not example:  # the first unknown columns, as a prompt / response pair
        example = dict(zip([c for c in columns if c not in KNOWN_COLUMNS], ("prompt", "response")))
    example = example or {"question": "prompt", "answer": "response"}
    partial = [
        f"{fmt.value} (missing {', '.join(c for c in required if c not in columns)})"
        for fmt, required in REQUIRED_COLUMNS.items()
        if any(c in columns for c in required)
    ]
    could_be = f"It could be: {'; '.join(partial)}.\n" if partial else ""
    raise DataError(
        f"{source}: cannot tell the data format from the columns {columns}.{hint}\n{could_be}{format_help()}\n"
        "Map your columns onto a format's with data.columns (YAML, e.g. `columns: {"
        + ", ".join(f"{a}: {b}" for a, b in example.items())
        + "}`; in Python, Dataset.rename_columns), or pass dataset_text_field= or formatting_func=."
    )


def columns_read(
    columns: Sequence[str], fmt: Format, text_field: str | None = None, images: bool = False
) -> list[str]:
    """The ``columns`` (named as after ``data.columns`` renaming) that rows of ``fmt`` are read from;
    the others are not used. ``images``: the rows go through a processor, which reads the image column."""
    wanted = (
        {text_field or "text"} if fmt is Format.TEXT else {*REQUIRED_COLUMNS[fmt], *OPTIONAL_COLUMNS[fmt]}
    )
    if text_field is not None and fmt is not Format.TEXT:  # dataset_text_field='prompt' on pairs
        wanted.add(text_field)
    if images:
        wanted.update(IMAGE_COLUMNS)
    return [c for c in columns if c in wanted]


def _looks_like_data(column: str) -> bool:
    return bool(column.strip()) and (" " in column.strip() or column[-1] in "?.!" or column.isdigit())


def implied_columns(columns: Sequence[str]) -> dict[str, str]:
    """The renaming a known public layout implies ({} when the columns already name a format, or
    match no layout). ShareGPT preference rows keep their columns: ``chosen`` ends the conversation."""
    if any(all(c in columns for c in required) for required in REQUIRED_COLUMNS.values()):
        return {}
    for required, mapping in COLUMN_LAYOUTS:
        if all(c in columns for c in required) and not any(new in columns for new in mapping.values()):
            return dict(mapping)
    return {}


def _as_text(value: Any, field_name: str, *, allow_empty: bool = True) -> str:
    if isinstance(value, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in value):
        value = "".join(str(p.get("text", "")) for p in value)  # content given as text parts
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise RowError(field_name, "is missing (null; NaN and an empty CSV cell read as null too)")
    if not isinstance(value, str):
        raise RowError(field_name, f"must be a string, got {type(value).__name__}: {str(value)[:60]!r}")
    if not allow_empty and not value.strip():
        raise RowError(field_name, "is empty; every response must have text to train on")
    return value


def drop_nulls(value: Any) -> Any:
    """Remove null-valued keys, recursively.

    Arrow stores a list of messages (or tool schemas) as structs with the union of every row's keys,
    filling the missing ones with null; templates test ``'tool_calls' in message`` or
    ``message.tool_calls is defined``, so a null key must look absent again. (A real null inside
    tool-call arguments is dropped too; store arguments as a JSON string to keep it.)
    """
    if isinstance(value, Mapping):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def _json_value(value: Any, field_name: str) -> Any:
    """A JSON string (as many data sets store tools and tool-call arguments) -> its value."""
    if not isinstance(value, str):
        return drop_nulls(value)
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RowError(field_name, f"is a string but not valid JSON ({err.msg}): {value[:60]!r}") from None


def normalise_tools(tools: Any) -> list[dict[str, Any]] | None:
    """The ``tools`` column: a list of function schemas, or that list as a JSON string."""
    if tools is None or tools == "" or tools == []:
        return None
    tools = _json_value(tools, "tools")
    if not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools):
        raise RowError("tools", f"must be a list of tool schemas (objects), got {type(tools).__name__}")
    return tools


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI-style tool calls, with ``arguments`` given as a JSON string turned into an object.

    Templates render arguments with ``| tojson``: a JSON string would be encoded twice.
    """
    calls = _json_value(calls, where)
    if isinstance(calls, Mapping):
        calls = [calls]
    if not isinstance(calls, list) or not calls:
        raise RowError(where, "must be a non-empty list of tool calls")
    out = []
    for k, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise RowError(f"{where}[{k}]", f"must be an object, got {type(call).__name__}")
        call = dict(call)
        function = call.get("function", call)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise RowError(
                f"{where}[{k}]", "needs a function name: {'function': {'name': ..., 'arguments': ...}}"
            )
        function = dict(function)
        arguments = function.get("arguments", function.pop("parameters", {}))
        function["arguments"] = _json_value(arguments, f"{where}[{k}].arguments")
        if "function" in call:
            call["function"] = function
            call.setdefault("type", "function")
        else:  # {"name": ..., "arguments": ...}, as LLaMA-Factory and some data sets write calls
            call = {"type": "function", "function": function}
        out.append(call)
    return out


def normalise_message(message: Any, where: str, role_key: str, content_key: str) -> dict[str, Any]:
    if type(message) is dict and len(message) == 2:  # the usual message: a known role and its text
        role, content = message.get(role_key), message.get(content_key)
        if role in ROLES and type(content) is str and (role != "assistant" or content.strip()):
            return {"role": role, "content": content}
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
    content = message.get(content_key)
    out: dict[str, Any] = {"role": role}
    if raw_role.lower() in TOOL_CALL_ROLES:  # the whole value is the call
        out["content"] = None
        out["tool_calls"] = _tool_calls(content, f"{where}.{content_key}")
        return out
    for key in MESSAGE_KEYS:
        if message.get(key) is not None:
            out[key] = message[key]
    if "tool_calls" in out:
        out["tool_calls"] = _tool_calls(out["tool_calls"], f"{where}.tool_calls")
    reasoning = next((message[k] for k in REASONING_KEYS if message.get(k) not in (None, "")), None)
    if reasoning is not None:
        text = _as_text(reasoning, f"{where}.reasoning_content")
        out["reasoning_content"] = text
    if content is None and "tool_calls" in out:
        out["content"] = None  # OpenAI's shape for a turn that only calls tools; templates expect it
    else:
        trained = role == "assistant" and "tool_calls" not in out and reasoning is None
        out["content"] = _as_text(content, f"{where}.{content_key}", allow_empty=not trained)
    return out


def normalise_messages(
    messages: Any, field_name: str, role_key: str = "role", content_key: str = "content"
) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise RowError(field_name, "must be a non-empty list of messages")
    out = [normalise_message(m, f"{field_name}[{i}]", role_key, content_key) for i, m in enumerate(messages)]
    _name_tool_results(out)
    return out


def _name_tool_results(messages: list[dict[str, Any]]) -> None:
    """Give a tool result without ``name`` the name of the call it answers (templates such as
    Llama-3.1's and Mistral's print it), matched by ``tool_call_id`` or by position."""
    pending: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and "tool_calls" in message:
            pending = list(message["tool_calls"])
        elif message["role"] == "tool" and pending:
            call = next((c for c in pending if c.get("id") == message.get("tool_call_id")), pending[0])
            pending.remove(call)
            message.setdefault("name", call["function"]["name"])
            if "id" in call:
                message.setdefault("tool_call_id", call["id"])


def template_kwargs(value: Any) -> dict[str, Any]:
    """The ``chat_template_kwargs`` column: an object (or JSON string) of template variables."""
    if value is None or value == "":
        return {}
    value = _json_value(value, "chat_template_kwargs")
    if not isinstance(value, Mapping):
        raise RowError("chat_template_kwargs", f"must be an object, got {type(value).__name__}")
    return dict(value)


def _with_system(row: Mapping[str, Any], turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = row.get("system")
    if system is None or system == "" or (turns and turns[0]["role"] == "system"):
        return turns
    return [{"role": "system", "content": _as_text(system, "system")}, *turns]


def pairs_as_chat(fmt: Format, pair_template: str) -> bool:
    """Whether pairs of this format go through the chat template: 'auto' renders prompt/completion
    raw (TRL's meaning of those columns) and prompt/response and Alpaca pairs as one chat turn."""
    return pair_template == "chat" or (pair_template == "auto" and fmt is not Format.PROMPT_COMPLETION)


def normalise_row(row: Mapping[str, Any], fmt: Format, text_field: str | None, pair_as_chat: bool) -> Example:
    """Turn one row of a known format into an example. Raises ``RowError``."""
    if text_field is None:
        _check_one_format(row, fmt)
    if fmt is Format.TEXT:
        name = text_field or "text"
        return TextExample(_as_text(row.get(name), name, allow_empty=False))
    if fmt is Format.MESSAGES:
        return _chat(row, normalise_messages(row.get("messages"), "messages"))
    if fmt is Format.SHAREGPT:
        turns = normalise_messages(row.get("conversations"), "conversations", "from", "value")
        chosen = row.get("chosen")
        if chosen is not None:  # a preference row: the conversation ends on the user; train the chosen answer
            chosen = chosen if isinstance(chosen, list) else [chosen]
            turns += normalise_messages(chosen, "chosen", "from", "value")
        return _chat(row, _with_system(row, turns))
    if fmt is Format.ALPACA:
        instruction = _as_text(row.get("instruction"), "instruction")
        extra = row.get("input")
        prompt_text = instruction if extra in (None, "") else f"{instruction}\n\n{_as_text(extra, 'input')}"
        return _pair(row, prompt_text, _as_text(row.get("output"), "output", allow_empty=False), pair_as_chat)
    if fmt in (Format.PROMPT_COMPLETION, Format.PROMPT_RESPONSE):
        answer_field = "completion" if fmt is Format.PROMPT_COMPLETION else "response"
        prompt, answer = row.get("prompt"), row.get(answer_field)
        if isinstance(prompt, list) and isinstance(answer, list):  # conversational prompt/completion
            context = _with_system(row, normalise_messages(prompt, "prompt"))
            return _chat(
                row, context + normalise_messages(answer, answer_field), first_trainable=len(context)
            )
        prompt_text = _as_text(prompt, "prompt")
        return _pair(row, prompt_text, _as_text(answer, answer_field, allow_empty=False), pair_as_chat)
    raise AssertionError(f"normalise_row does not handle {fmt}")  # tokenized rows never get here


def _check_one_format(row: Mapping[str, Any], fmt: Format) -> None:
    """A row missing its format's columns but holding another format's: the data mixes formats
    (read as the first format whose columns appear among all rows' columns)."""
    required = REQUIRED_COLUMNS.get(fmt, ())
    missing = [c for c in required if row.get(c) is None]
    if not missing:
        return
    present = [c for c, v in row.items() if v is not None]
    other = next(
        (f for f, cols in REQUIRED_COLUMNS.items() if f is not fmt and all(c in present for c in cols)), None
    )
    if other is None:
        return  # a plain missing value: reported by the field's own check
    raise RowError(
        missing[0],
        f"is missing: this row has the columns of the {other.value} format "
        f"({', '.join(REQUIRED_COLUMNS[other])}), while the data set is read as {fmt.value}. "
        "One data set holds one format: put these rows in a file of their own and list both files as "
        "sources of a mixture (data.train: [{path: ...}, {path: ...}]), or convert them",
    )


def row_formats(table: pa.Table) -> dict[Format, tuple[int, int]]:
    """The formats the rows have, each row counted under the first (in detection order) whose
    required columns it sets: {format: (index of its first row, rows)}. Rows with none are left out.
    Vectorised over the Arrow columns: a few passes over the data."""
    taken = None  # rows already counted
    out: dict[Format, tuple[int, int]] = {}
    for fmt, required in REQUIRED_COLUMNS.items():
        if not all(c in table.column_names for c in required):
            continue
        has = pc.is_valid(table.column(required[0]))
        for column in required[1:]:
            has = pc.and_(has, pc.is_valid(table.column(column)))
        mine = has if taken is None else pc.and_(has, pc.invert(taken))
        taken = has if taken is None else pc.or_(taken, has)
        count = pc.sum(mine).as_py() or 0
        if count:
            out[fmt] = (pc.index(mine, True).as_py(), count)
    return out


def mixed_formats_error(
    where: str, formats: Mapping[Format, tuple[int, int]], read_as: Format, places: Mapping[int, str]
) -> DataError:
    """The error for rows of several formats in one data set (``row_formats``), naming the first
    row of each (``places``: where a row is, by index)."""
    lines = [
        f"  {fmt.value} ({', '.join(REQUIRED_COLUMNS[fmt])}): {count} row{'s' if count > 1 else ''}"
        + (f", the first at {places[first]}" if first in places else "")
        for fmt, (first, count) in formats.items()
    ]
    return DataError(
        f"{where}: the rows mix data formats (a row's format is the first whose columns it sets):\n"
        + "\n".join(lines)
        + f"\nA data set is read in one format (here {read_as.value}, the first whose columns the rows have). "
        "Put each kind of row in a file of its own and list the files as sources of a mixture "
        "(data.train: [{path: chats.jsonl}, {path: pairs.jsonl}]), convert the rows to one format, or set "
        f"skip_invalid_rows=true to train on the {read_as.value} rows only (the others are dropped and counted)."
    )


def split_turns(example: ChatExample) -> list[ChatExample]:
    """One example per trained assistant turn: the conversation up to and through that turn, only
    the turn itself trained. The history of each is rendered as the model sees it at inference."""
    return [
        ChatExample(example.messages[: i + 1], i, example.tools, example.template_kwargs)
        for i, message in enumerate(example.messages)
        if message["role"] == "assistant" and i >= example.first_trainable
    ]


def _chat(row: Mapping[str, Any], messages: list[dict[str, Any]], first_trainable: int = 0) -> ChatExample:
    return ChatExample(
        messages,
        first_trainable=first_trainable,
        tools=normalise_tools(row.get("tools")),
        template_kwargs=template_kwargs(row.get("chat_template_kwargs")),
    )


def _pair(row: Mapping[str, Any], prompt: str, answer: str, as_chat: bool) -> Example:
    if as_chat:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return _chat(row, _with_system(row, turns))
    system = row.get("system")
    if system not in (None, ""):  # raw text has no system role: the system text opens the prompt
        prompt = f"{_as_text(system, 'system')}\n\n{prompt}"
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
