"""Loss masks per data format, through ``prepare`` (the path training uses).

Each test decodes the tokens whose label is not -100 and asserts they are exactly the responses /
assistant turns plus the end-of-turn or EOS token, and that the full row is the expected text.
"""

from __future__ import annotations

import pytest
import tokenizers_zoo as zoo

from sftrainer.constants import IGNORE_INDEX

CONV = zoo.CONVERSATION  # system, user, assistant, user, assistant


@pytest.fixture(scope="module")
def chatml():
    return zoo.chatml()  # no BOS; <|im_end|> is both end of turn and EOS


@pytest.fixture(scope="module")
def llama3():
    return zoo.llama3()  # adds BOS; <|eot_id|> ends a turn, <|end_of_text|> is EOS


def full_text(tok, row: dict) -> str:
    return tok.decode(row["input_ids"])


# ---- text ---------------------------------------------------------------------------------


def test_text_trains_every_token_and_eos(llama3):
    rows, stats = zoo.prep([{"text": "The quick brown fox."}, {"text": "Hello world!"}], llama3)
    assert stats.format == "text" and stats.kept == 2
    for row, text in zip(rows, ["The quick brown fox.", "Hello world!"]):
        assert row["input_ids"][0] == llama3.bos_token_id and row["labels"][0] == IGNORE_INDEX
        assert zoo.trained_spans(llama3, row["input_ids"], row["labels"]) == [text + "<|end_of_text|>"]
        assert full_text(llama3, row) == "<|begin_of_text|>" + text + "<|end_of_text|>"


def test_text_already_ending_with_eos_is_not_doubled(chatml):
    rows, _ = zoo.prep([{"text": "Hello world!<|im_end|>"}], chatml)
    assert full_text(chatml, rows[0]) == "Hello world!<|im_end|>"
    assert rows[0]["input_ids"].count(chatml.eos_token_id) == 1


# ---- prompt + completion (raw text) -------------------------------------------------------


def test_prompt_completion_is_raw_prompt_completion_eos(llama3):
    data = [
        {"prompt": "Question: what is two plus two? Answer:", "completion": " four."},
        {"prompt": "Translate to French: good morning.\n", "completion": "Bonjour."},
    ]
    rows, stats = zoo.prep(data, llama3)
    assert stats.format.startswith("prompt_completion, raw")
    for row, item in zip(rows, data):
        assert (
            full_text(llama3, row)
            == "<|begin_of_text|>" + item["prompt"] + item["completion"] + "<|end_of_text|>"
        )
        assert zoo.trained_spans(llama3, row["input_ids"], row["labels"]) == [
            item["completion"] + "<|end_of_text|>"
        ]
        prompt_ids = llama3(item["prompt"])["input_ids"]  # with BOS, as the tokenizer adds it
        assert row["input_ids"][: len(prompt_ids)] == prompt_ids
        assert set(row["labels"][: len(prompt_ids)]) == {IGNORE_INDEX}


def test_prompt_completion_with_pair_template_chat(chatml):
    rows, stats = zoo.prep([{"prompt": "Hi?", "completion": "Hello."}], chatml, pair_template="chat")
    assert stats.format == "prompt_completion, chat template"
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == ["Hello.<|im_end|>"]


# ---- prompt + response and Alpaca (one chat turn) -----------------------------------------


def test_prompt_response_is_one_chat_turn(chatml):
    data = [{"prompt": "What is the capital of France?", "response": "The capital is Paris."}]
    rows, stats = zoo.prep(data, chatml)
    assert stats.format == "prompt_response, chat template"
    rendered = chatml.apply_chat_template(
        [
            {"role": "user", "content": data[0]["prompt"]},
            {"role": "assistant", "content": data[0]["response"]},
        ],
        tokenize=False,
    )
    assert full_text(chatml, rows[0]) == rendered
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == [
        "The capital is Paris.<|im_end|>"
    ]


def test_prompt_response_with_system_column(llama3):
    data = [
        {"system": "You are a terse assistant.", "prompt": "And of Italy?", "response": "Rome, of course."}
    ]
    rows, _ = zoo.prep(data, llama3)
    text = full_text(llama3, rows[0])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a terse")
    assert zoo.trained_spans(llama3, rows[0]["input_ids"], rows[0]["labels"]) == [
        "Rome, of course.<|eot_id|>"
    ]


def test_prompt_response_with_pair_template_raw(llama3):
    rows, stats = zoo.prep([{"prompt": "Q: hi\nA:", "response": " hello"}], llama3, pair_template="raw")
    assert stats.format == "prompt_response, raw"
    assert full_text(llama3, rows[0]) == "<|begin_of_text|>Q: hi\nA: hello<|end_of_text|>"
    assert zoo.trained_spans(llama3, rows[0]["input_ids"], rows[0]["labels"]) == [" hello<|end_of_text|>"]


def test_dataset_text_field_prompt_trains_the_response_not_the_prompt(chatml):
    rows, stats = zoo.prep([{"prompt": "Hi?", "response": "Hello."}], chatml, text_field="prompt")
    assert stats.format.startswith("prompt_response")
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == ["Hello.<|im_end|>"]


@pytest.mark.parametrize(
    ("row", "user_text"),
    [
        ({"instruction": "Translate to French.", "input": "good morning", "output": "Bonjour."},
         "Translate to French.\n\ngood morning"),
        ({"instruction": "Write a haiku about the sea.", "input": "", "output": "Waves fold."},
         "Write a haiku about the sea."),
        ({"instruction": "Say hello.", "output": "Hello world!"}, "Say hello."),
    ],
)  # fmt: skip
def test_alpaca(chatml, row, user_text):
    rows, stats = zoo.prep([row], chatml)
    assert stats.format == "alpaca, chat template"
    rendered = chatml.apply_chat_template(
        [{"role": "user", "content": user_text}, {"role": "assistant", "content": row["output"]}],
        tokenize=False,
    )
    assert full_text(chatml, rows[0]) == rendered
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == [
        row["output"] + "<|im_end|>"
    ]


# ---- conversations ------------------------------------------------------------------------


def test_messages_multi_turn_trains_every_assistant_turn(llama3):
    rows, stats = zoo.prep([{"messages": CONV}], llama3)
    assert stats.format == "messages, chat template"
    assert full_text(llama3, rows[0]) == llama3.apply_chat_template(CONV, tokenize=False)
    assert zoo.trained_spans(llama3, rows[0]["input_ids"], rows[0]["labels"]) == [
        "The capital is Paris.<|eot_id|>",
        "Rome, of course.<|eot_id|>",
    ]


def test_sharegpt_human_gpt(chatml):
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    conv = [{"from": speakers[m["role"]], "value": m["content"]} for m in CONV]
    rows, stats = zoo.prep([{"conversations": conv, "id": "a1"}], chatml)
    assert stats.format == "sharegpt, chat template"
    assert full_text(chatml, rows[0]) == chatml.apply_chat_template(CONV, tokenize=False)
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == [
        "The capital is Paris.<|im_end|>",
        "Rome, of course.<|im_end|>",
    ]


def test_conversational_prompt_completion_trains_only_the_completion(chatml):
    row = {"prompt": CONV[:4], "completion": CONV[4:]}
    rows, _ = zoo.prep([row], chatml)
    assert full_text(chatml, rows[0]) == chatml.apply_chat_template(CONV, tokenize=False)
    # The assistant turn inside the prompt is context: not trained.
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == [
        "Rome, of course.<|im_end|>"
    ]


def test_train_on_last_turn(llama3):
    rows, _ = zoo.prep([{"messages": zoo.THREE_TURNS}], llama3, train_on="last_turn")
    assert zoo.trained_spans(llama3, rows[0]["input_ids"], rows[0]["labels"]) == ["The Tiber.<|eot_id|>"]


@pytest.mark.parametrize("tok_name", ["chatml", "llama3"])
def test_train_on_all_trains_every_token(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    rows, _ = zoo.prep([{"messages": CONV}], tok, train_on="all")
    ids, labels = rows[0]["input_ids"], rows[0]["labels"]
    rendered = tok.apply_chat_template(CONV, tokenize=False)
    assert full_text(tok, rows[0]) == rendered  # nothing added: the last turn already ends the text
    # Every token of the conversation is trained; only whitespace after its last token is not.
    assert zoo.trained_spans(tok, ids, labels) == [rendered.rstrip()]


def test_train_on_all_for_raw_pairs_trains_the_prompt_too(llama3):
    rows, _ = zoo.prep([{"prompt": "2+2=", "completion": "4"}], llama3, train_on="all")
    assert zoo.trained_spans(llama3, rows[0]["input_ids"], rows[0]["labels"]) == ["2+2=4<|end_of_text|>"]


# ---- pre-tokenized ------------------------------------------------------------------------


def test_pretokenized_rows_pass_through():
    data = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11]},
    ]
    rows, stats = zoo.prep(data, zoo.chatml())
    assert stats.format == "tokenized"
    assert rows == data


def test_pretokenized_without_labels_trains_everything():
    rows, _ = zoo.prep([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]}], zoo.chatml())
    assert rows == [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}]


# ---- other inputs -------------------------------------------------------------------------


def test_column_mapping(chatml):
    rows, _ = zoo.prep(
        [{"question": "Hi?", "answer": "Hello."}],
        chatml,
        columns={"question": "prompt", "answer": "response"},
    )
    assert zoo.trained_spans(chatml, rows[0]["input_ids"], rows[0]["labels"]) == ["Hello.<|im_end|>"]


def test_formatting_func_returning_text_or_a_row(chatml):
    from sftrainer.data.load import load
    from sftrainer.data.prepare import DataSettings, prepare

    data = load([{"q": "Hi?", "a": "Hello."}])
    as_text, stats = prepare(
        data, chatml, DataSettings(), formatting_func=lambda r: f"Q: {r['q']} A: {r['a']}"
    )
    assert stats.format == "formatting_func"
    assert zoo.trained_spans(chatml, as_text[0]["input_ids"], as_text[0]["labels"]) == [
        "Q: Hi? A: Hello.<|im_end|>"
    ]
    as_pair, _ = prepare(
        data, chatml, DataSettings(), formatting_func=lambda r: {"prompt": r["q"], "response": r["a"]}
    )
    assert zoo.trained_spans(chatml, as_pair[0]["input_ids"], as_pair[0]["labels"]) == ["Hello.<|im_end|>"]


def test_builtin_tokenizer_masks(tokenizer):
    """The project's own tokenizer (template emits BOS, tokenizer adds BOS): one BOS, exact masks."""
    pair, _ = zoo.prep([{"prompt": "Sort the words: cat apple", "response": "apple cat"}], tokenizer)
    chat, _ = zoo.prep([{"messages": CONV}], tokenizer)
    for row in (*pair, *chat):
        assert row["input_ids"][0] == tokenizer.bos_token_id
        assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert zoo.trained_spans(tokenizer, pair[0]["input_ids"], pair[0]["labels"]) == ["apple cat<|im_end|>"]
    assert zoo.trained_spans(tokenizer, chat[0]["input_ids"], chat[0]["labels"]) == [
        "The capital is Paris.<|im_end|>",
        "Rome, of course.<|im_end|>",
    ]
