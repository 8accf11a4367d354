"""Data sets that stand in for ``trl-internal-testing/{zen,toolcall,harmony}``: the same configs,
columns and splits (19 rows split 17 / 2 without shuffling, as TRL's ``train_test_split(test_size=0.1,
shuffle=False)``), with text of our own.

The Zen of Python's 19 aphorisms come from Python itself (``import this``, PEP 20); the prompt /
completion split, the questions, the rejected answers, the tool calls and the reasoning are written
here. Row count and format are what TRL's tests depend on; the exact wording is not (see the
harness README for what a different wording can change: token counts, hence packed row counts).
"""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

TEST_SIZE = 0.1


def aphorisms() -> list[str]:
    """PEP 20's 19 aphorisms, decoded from the ``this`` module (which prints them when imported)."""
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = "".join(this.d.get(c, c) for c in this.s)
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[1:]  # the first line is the title


def _split(line: str) -> tuple[str, str]:
    """(prompt, completion): the first half of the words, then the rest with its leading space."""
    words = line.split(" ")
    cut = max(1, len(words) // 2)
    return " ".join(words[:cut]), " " + " ".join(words[cut:])


def _rejected(line: str) -> str:
    """A wrong ending: the second half of the words in reverse order."""
    prompt, completion = _split(line)
    return prompt + " " + " ".join(reversed(completion.split()))


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", **extra, "content": text}


def zen_rows() -> dict[str, dict[str, list]]:
    """Columns of each ``zen`` config, before splitting."""
    lines = aphorisms()
    pairs = [_split(line) for line in lines]
    questions = [_user(f"How does this line of the Zen of Python end? {p} ...") for p, _ in pairs]
    answers = [_assistant(line) for line in lines]
    return {
        "standard_language_modeling": {"text": lines},
        "standard_prompt_completion": {"prompt": [p for p, _ in pairs], "completion": [c for _, c in pairs]},
        "standard_implicit_prompt_preference": {"chosen": lines, "rejected": [_rejected(x) for x in lines]},
        "conversational_language_modeling": {"messages": [[q, a] for q, a in zip(questions, answers)]},
        "conversational_prompt_completion": {
            "prompt": [[q] for q in questions],
            "completion": [[a] for a in answers],
        },
    }


def harmony_rows() -> dict[str, dict[str, list]]:
    """``harmony`` (gpt-oss) rows: assistant turns with ``thinking``, and ``chat_template_kwargs``."""
    lines = aphorisms()
    efforts = ("low", "medium", "high")
    kwargs = [
        {"reasoning_effort": efforts[i % 3], "model_identity": "You are a tiny test model."}
        for i in range(len(lines))
    ]
    questions = [_user(f"Quote line {i + 1} of the Zen of Python.") for i in range(len(lines))]
    answers = [
        _assistant(line, thinking=f"Line {i + 1} has {len(line.split())} words.")
        for i, line in enumerate(lines)
    ]
    return {
        "language_modeling": {
            "messages": [[q, a] for q, a in zip(questions, answers)],
            "chat_template_kwargs": kwargs,
        },
        "prompt_completion": {
            "prompt": [[q] for q in questions],
            "completion": [[a] for a in answers],
            "chat_template_kwargs": kwargs,
        },
    }


def _tools() -> dict[str, dict]:
    from transformers.utils import get_json_schema

    def zen_line(number: int) -> str:
        """
        Returns one line of the Zen of Python.

        Args:
            number: The line number, from 1 to 19.
        """
        return ""

    def count_words(text: str) -> int:
        """
        Counts the words of a text.

        Args:
            text: The text whose words to count.
        """
        return 0

    def translate(text: str, language: str) -> str:
        """
        Translates a text.

        Args:
            text: The text to translate.
            language: The language to translate it into.
        """
        return ""

    return {f.__name__: get_json_schema(f) for f in (zen_line, count_words, translate)}


def toolcall_rows() -> dict[str, dict[str, list]]:
    """``toolcall`` rows: a tool call, its result and the final answer, with the tools offered."""
    tools = _tools()
    lines = aphorisms()
    messages, offered = [], []
    for i in range(8):
        number = 2 * i + 1
        line = lines[number - 1]
        if i % 2 == 0:
            call, args, result = "zen_line", {"number": number}, line
            answer = f"Line {number} reads: {line}"
        else:
            call, args, result = "count_words", {"text": line}, str(len(line.split()))
            answer = f"That line has {result} words."
        messages.append(
            [
                _user(
                    f"Look up line {number} of the Zen of Python."
                    if i % 2 == 0
                    else f"How many words in: {line}"
                ),
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": call, "arguments": args}}],
                },
                {"role": "tool", "name": call, "content": result},
                _assistant(answer),
            ]
        )
        offered.append(json.dumps([tools[call], tools["translate"]]))
    return {"language_modeling": {"messages": messages, "tools": offered}}


def dataset_dicts() -> dict[tuple[str, str], Any]:
    """``{(repo id, config): DatasetDict(train, test)}`` of every stand-in data set."""
    from datasets import Dataset

    out = {}
    for repo, configs, mixed in (
        ("trl-internal-testing/zen", zen_rows(), None),
        ("trl-internal-testing/harmony", harmony_rows(), None),
        # Messages of several shapes (content / tool_calls / name) are stored as JSON, as TRL stores its set.
        ("trl-internal-testing/toolcall", toolcall_rows(), "use_json"),
    ):
        for config, columns in configs.items():
            data = Dataset.from_dict(columns, on_mixed_types=mixed)
            out[(repo, config)] = data.train_test_split(test_size=TEST_SIZE, shuffle=False)
    return out


def corpus() -> tuple[str, ...]:
    """Text the stand-in tokenizers are trained on: every string of the data sets, plus common words."""
    texts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for rows in (zen_rows(), harmony_rows(), toolcall_rows()):
        walk(rows)
    texts += [
        "system user assistant tool You are a helpful assistant. The answer is 0 1 2 3 4 5 6 7 8 9.",
        "hello world, the quick brown fox jumps over the lazy dog; again and again, said the teacher.",
    ]
    return tuple(texts * 3)
