"""How many prepared rows differ from what inference gives, on released tokenizers and templates.

    .venv/bin/python bench/inference_match.py --out bench/inference-match.json
    # the same data through another sftrainer checkout (e.g. the commit before a fix):
    git worktree add /tmp/before <commit> && \\
      .venv/bin/python bench/inference_match.py --sftrainer /tmp/before --out /tmp/before.json

Each row is prepared by ``ExampleTokenizer`` and checked against ``tests/data/inference_oracle.py``
(which shares no code with the pipeline): the tokens before each trained span must be the ids
inference gives that prompt, the trained text each answer and the token that ends its turn, nothing
else trained. A row that fails is counted once, under the first check it fails (``prompt``: the
prompt's tokens differ from inference; ``text``: the trained text differs; ``spans``: turns trained
that should not be, or missed; ``error``: preparation raised).

Data (generated, seeded; no hub):

- ``chat``: instruction/answer pairs as one user/assistant turn, answers of the shapes real data
  has (prose, code fences, JSON, lists, answers that open with punctuation);
- ``multi_turn``: 2-3 turn conversations with a system prompt;
- ``pairs``: the same instructions as raw prompt/completion text (prompt ending as Alpaca rows do);
- ``cut``: text and code cut at a random character, the completion continuing the prompt (as
  completion data and fill-in-the-middle rows are made).

Pairs of tokenizer and template: each released tokenizer in ``tests/data/tokenizers`` with the
templates released for it (Mistral-7B with Mistral-7B-Instruct v0.1's and Llama-2's; Llama-3.1 with
its own), and with ChatML (its tokens added, as ``clone_chat_template`` does); every template in
``tests/data/chat_templates`` with the byte-level tokenizer the tests build for it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the",
    "model",
    "data",
    "answer",
    "question",
    "value",
    "list",
    "function",
    "return",
    "result",
    "first",
    "second",
    "city",
    "water",
    "light",
    "time",
    "people",
    "world",
    "number",
    "example",
    "table",
    "code",
    "file",
    "line",
    "string",
    "print",
    "error",
    "reason",
    "step",
]


def phrase(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def answer(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind == 0:
        return f"```python\ndef {rng.choice(WORDS)}(x):\n    return x + {rng.randint(1, 9)}\n```"
    if kind == 1:
        return json.dumps({rng.choice(WORDS): rng.randint(1, 99), rng.choice(WORDS): phrase(rng, 1, 3)})
    if kind == 2:
        return "\n".join(f"{k + 1}. {phrase(rng, 2, 6).capitalize()}." for k in range(rng.randint(2, 4)))
    if kind == 3:
        return f"- {phrase(rng, 2, 5)}\n- {phrase(rng, 2, 5)}"
    if kind == 4:
        return f"({phrase(rng, 1, 3)}) {phrase(rng, 3, 10)}."
    if kind == 5:
        return f": {phrase(rng, 2, 8)}"
    return phrase(rng, 4, 25).capitalize() + "."


def instruction(rng: random.Random) -> str:
    return rng.choice(
        [
            f"Write a function that returns the {rng.choice(WORDS)}.",
            f"What is the {phrase(rng, 1, 3)}?",
            f"Explain {phrase(rng, 2, 5)} in one sentence.",
            f"Give the {rng.choice(WORDS)} as JSON:",
            f"List three {rng.choice(WORDS)}s.",
        ]
    )


def datasets(rows: int, seed: int = 0) -> dict[str, list]:
    rng = random.Random(seed)
    chat = [
        [{"role": "user", "content": instruction(rng)}, {"role": "assistant", "content": answer(rng)}]
        for _ in range(rows)
    ]
    multi = []
    for _ in range(rows):
        messages = [{"role": "system", "content": phrase(rng, 3, 8).capitalize() + "."}]
        for _ in range(rng.randint(2, 3)):
            messages += [
                {"role": "user", "content": instruction(rng)},
                {"role": "assistant", "content": answer(rng)},
            ]
        multi.append(messages)
    pairs = [(f"### Instruction:\n{instruction(rng)}\n\n### Response:\n", answer(rng)) for _ in range(rows)]
    cut = []
    for _ in range(rows):
        text = answer(rng) if rng.random() < 0.5 else phrase(rng, 6, 20)
        k = rng.randint(1, len(text) - 1)
        cut.append((text[:k], text[k:]))
    tools = []
    for _ in range(rows):
        city, call = rng.choice(WORDS).capitalize(), f"call{rng.randint(10000, 99999)}"
        tools.append(
            [
                {"role": "user", "content": f"What is the weather in {city}?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call,
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": {"city": city}},
                        }
                    ],
                },
                *(
                    [
                        {
                            "role": "tool",
                            "tool_call_id": call,
                            "name": "get_weather",
                            "content": '{"celsius": 21}',
                        },
                        {"role": "assistant", "content": answer(rng)},
                    ]
                    if rng.random() < 0.7
                    else []
                ),
            ]
        )
    return {"chat": chat, "multi_turn": multi, "tools": tools, "pairs": pairs, "cut": cut}


def cases(names: list[str], real: list[str]) -> list[tuple[str, str, str]]:
    """(dataset kind, tokenizer, template): chat data with templates, raw data with tokenizers."""
    out = [("raw", tok, "") for tok in real]
    out += [("chat", "mistral-7b-v0.1:native", t) for t in ("mistral-7b-instruct-v0.1", "llama-2-chat")]
    out += [("chat", "llama-3.1-instruct:native", "llama-3.1-instruct")]
    out += [("chat", tok, "chatml-openhermes") for tok in real]
    out += [("chat", "built", name) for name in names]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sftrainer", type=Path, default=ROOT, help="checkout whose sftrainer prepares the rows"
    )
    parser.add_argument("--rows", type=int, default=300, help="rows of each data set")
    parser.add_argument("--templates", nargs="*", help="chat templates (default: all in tests/data)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sys.path[:0] = [str(args.sftrainer), str(ROOT / "tests" / "data")]
    import inference_oracle as oracle
    import real_tokenizers
    import released_templates as rt

    WEATHER_TOOL = rt.WEATHER_TOOL

    from sftrainer.data.formats import ChatExample, PairExample, normalise_messages
    from sftrainer.data.tokenize import ExampleTokenizer

    data = datasets(args.rows)
    results = []
    for kind, tok_name, template in cases(args.templates or rt.NAMES, real_tokenizers.NAMES):
        if tok_name == "built":
            tok = rt.tokenizer(template)
        else:
            real = tok_name.removesuffix(":native")
            specials = () if tok_name.endswith(":native") or not template else rt.specials(template)
            tok = real_tokenizers.with_tokens(real, tuple(specials))
            tok = real_tokenizers.templated(tok, rt.template(template) if template else None)
        info = rt.INDEX.get(template, {})
        eot = info.get("end_of_turn")
        eot = eot if eot and eot in rt.template(template) else tok.eos_token
        stops = tuple(info.get("stop_tokens") or ())
        kwargs = dict(info.get("template_kwargs") or {})
        encoder = ExampleTokenizer(tok, template_kwargs=kwargs)
        for name in ("chat", "multi_turn", "tools") if kind == "chat" else ("pairs", "cut"):
            failures: Counter[str] = Counter()
            started = time.perf_counter()
            for item in data[name]:
                try:
                    if kind == "chat":
                        tools = [WEATHER_TOOL] if name == "tools" else None
                        try:
                            oracle.render(tok, item, tools=tools, **kwargs)
                        except Exception:  # a template without a system role: the conversation without it
                            item = [m for m in item if m["role"] != "system"]
                        example = ChatExample(
                            normalise_messages(json.loads(json.dumps(item)), "messages"), tools=tools
                        )
                        rows = encoder.tokenize([example])
                        full, turns = oracle.expected_turns(tok, item, eot, stops, tools=tools, **kwargs)
                        oracle.check_chat_rows(tok, rows, full, turns)
                    else:
                        rows = encoder.tokenize([PairExample(*item)])
                        oracle.check_pair_row(tok, rows, *item)
                except AssertionError as err:
                    text = str(err)
                    failures[
                        "prompt" if "prompt" in text else "text" if "trained text" in text else "spans"
                    ] += 1
                except Exception as err:  # a template that refuses the row: reported, not counted as wrong
                    failures[f"error: {type(err).__name__}"] += 1
            results.append(
                {
                    "tokenizer": tok_name,
                    "template": template or None,
                    "data": name,
                    "rows": len(data[name]),
                    "differ": sum(v for k, v in failures.items() if not k.startswith("error")),
                    "by_check": dict(failures),
                    "seconds": round(time.perf_counter() - started, 2),
                }
            )
            r = results[-1]
            print(
                f"{tok_name:28} {template or '(raw)':34} {name:10} {r['differ']:4}/{r['rows']} {dict(failures)}"
            )
    total = sum(r["differ"] for r in results)
    print(f"rows that differ from inference: {total} of {sum(r['rows'] for r in results)}")
    if args.out:
        args.out.write_text(
            json.dumps({"sftrainer": str(args.sftrainer), "results": results}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
