"""``sftrainer.data.content``: which columns are read, and the rows with tools, tool calls, reasoning."""

from __future__ import annotations

from sftrainer.data.content import classify_columns, count_content


def test_counts_each_kind_once_per_row_over_the_columns_read():
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    rows = [
        {"tools": '[{"type": "function"}]', "messages": [{"role": "assistant", "tool_calls": [call]}]},
        {"tools": "[]", "messages": [{"role": "assistant", "content": "<think>hm</think>yes"}]},
        {"tools": None, "messages": [{"role": "user", "content": "<think> is a tag"}]},  # a user's text
        {
            "conversations": [
                {"from": "function_call", "value": '{"name": "f"}'},
                {"from": "gpt", "value": "ok", "thinking": "..."},
            ]
        },
        {
            "messages": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "tool_calls": [call]}],
        },
    ]
    counts = count_content(rows, ["tools", "messages", "conversations"])
    assert (counts.rows, counts.tools, counts.tool_calls, counts.reasoning) == (5, 1, 2, 2)
    assert counts.describe() == "1 with tools, 2 with tool calls, 2 with reasoning (of 5 rows)"


def test_columns_outside_the_format_are_ignored_by_their_own_names():
    assert classify_columns(["messages", "message_tree_id", "tools"], {}, None, False) == (
        ["messages", "tools"],
        ["message_tree_id"],
    )
    # dolly's layout: context -> input, read; `category` is not
    mapping = {"context": "input", "response": "output"}
    read, ignored = classify_columns(["instruction", "context", "response", "category"], mapping, None, False)
    assert (read, ignored) == (["instruction", "context", "response"], ["category"])
    assert classify_columns(["messages", "images"], {}, None, True) == (["messages", "images"], [])
    assert classify_columns(["messages", "images"], {}, None, False) == (["messages"], ["images"])
    assert classify_columns(["a", "b"], {}, None, False) == (["a", "b"], [])  # no format: preparing says so
