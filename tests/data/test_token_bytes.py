"""Token counts read from ids (sftrainer.data.token_bytes) are the counts offsets give, and every
tokenizer or row they cannot be read from for certain is left to offsets."""

from __future__ import annotations

import copy

import pytest
import released_templates as rt
import tokenizers_zoo as zoo
from tokenizers import AddedToken, normalizers, pre_tokenizers

from sftrainer.data.encode import SegmentEncoder
from sftrainer.data.formats import ChatExample, PairExample, TextExample, normalise_messages
from sftrainer.data.token_bytes import ByteLengths
from sftrainer.data.tokenize import ExampleTokenizer

TEXTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
    "Caf\u00e9 cr\u00e8me, \u65e5\u672c\u8a9e and \U0001f642 \U0001f642  done.\n\n\tEnd",
    "   leading spaces and trailing   ",
    "The capital is Paris.",
]


def chatml():
    return zoo.chatml()


def splits(text: str) -> list[list[str]]:
    """The text cut in two at every character, and in three at a few places."""
    out = [[text[:k], text[k:]] for k in range(1, len(text))]
    third = len(text) // 3
    out += [[text[:k], text[k : k + third], text[k + third :]] for k in range(1, len(text) - third, 7)]
    return [pieces for pieces in out if all(pieces)]


def by_offsets(tok, text: str, pieces: list[str]):
    return SegmentEncoder(tok)._counts_from_offsets([text], [pieces])[0]


@pytest.mark.parametrize("text", TEXTS)
def test_counts_read_from_ids_are_what_offsets_give(text):
    tok = chatml()
    lengths = ByteLengths.of(tok)
    assert lengths is not None
    [ids] = lengths.encode([text])
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    # Where the tokens meet, by decoding the first j tokens (an oracle independent of both readings).
    meets = set()
    for j in range(1, len(ids)):
        head = tok.decode(ids[:j])
        if text.startswith(head):
            meets.add(len(head))
    for pieces in splits(text):
        counts = lengths.counts(text, ids, pieces)
        if len(pieces) == 2:
            assert (counts is not None) == (len(pieces[0]) in meets), pieces
        if counts is not None:
            assert sum(counts) == len(ids)
            assert (ids, counts) == by_offsets(tok, text, pieces), pieces


def test_a_token_across_a_boundary_is_not_read_from_ids():
    tok = chatml()
    lengths = ByteLengths.of(tok)
    text = "The capital is Paris."
    [ids] = lengths.encode([text])
    word = tok("Paris", add_special_tokens=False)["input_ids"]
    assert len(word) == 1  # "Paris" is one token: no boundary inside it is clean
    for k in range(1, len("Paris")):
        cut = text.index("Paris") + k
        assert lengths.counts(text, ids, [text[:cut], text[cut:]]) is None


def test_tokenizers_that_change_text_are_not_read_from_ids():
    assert ByteLengths.of(zoo.gemma()) is None  # Metaspace: spaces become "▁"
    prefixed = chatml()
    prefixed.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert ByteLengths.of(prefixed) is None
    removing = chatml()
    removing.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("x", behavior="removed"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert ByteLengths.of(removing) is None


def test_a_row_the_normalizer_changes_is_left_to_offsets():
    tok = chatml()
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    lengths = ByteLengths.of(tok)
    for text, readable in (("the capital is paris.", True), ("The capital is Paris.", False)):
        [ids] = lengths.encode([text])
        counts = lengths.counts(text, ids, [text[:3], text[3:]])
        assert (counts is not None) == readable
        if readable:
            assert (ids, counts) == by_offsets(tok, text, [text[:3], text[3:]])


def test_an_added_token_that_strips_whitespace_is_not_read_from_ids():
    """ "<tool> \\n" is one token that swallows the whitespace: its bytes do not add up."""
    tok = chatml()
    tok.add_tokens([AddedToken("<tool>", rstrip=True, lstrip=True)])
    lengths = ByteLengths.of(tok)
    text = "Call <tool>  \n the weather."
    [ids] = lengths.encode([text])
    assert tok.convert_tokens_to_ids("<tool>") in ids
    assert lengths.counts(text, ids, [text[:5], text[5:]]) is None


def test_a_tokenizer_set_to_truncate_or_pad_is_not_read_from_ids():
    tok = chatml()
    lengths = ByteLengths.of(tok)
    tok.backend_tokenizer.enable_truncation(4)
    assert lengths.encode(["The capital is Paris."]) is None
    tok.backend_tokenizer.no_truncation()
    tok.backend_tokenizer.enable_padding(length=64)
    assert lengths.encode(["The capital is Paris."]) is None


class ByOffsets(ExampleTokenizer):
    """Every row read from offsets."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder._byte_lengths = None


def examples() -> list:
    out: list = [
        TextExample("Caf\u00e9 \U0001f642 text,   with  spaces.\n"),
        PairExample("Question: what is two plus two?", " Four."),
        PairExample("\u65e5\u672c\u8a9e?", "\u306f\u3044\u3002"),
    ]
    for conv in (rt.TWO_TURNS, rt.SYSTEM_ONE_TURN, rt.REASONING):
        messages = normalise_messages(copy.deepcopy(conv), "messages")
        out += [ChatExample(messages), ChatExample(messages, first_trainable=2)]
    out.append(
        ChatExample(normalise_messages(copy.deepcopy(rt.TOOL_CALL), "messages"), tools=[rt.WEATHER_TOOL])
    )
    return out


def rendered(encoder: ExampleTokenizer) -> list:
    rows = []
    for example in examples():
        try:
            rows.append((example, encoder.segments(example)))
        except Exception:  # a template that cannot render one of them (no tool support)
            continue
    return rows


NAMES = ["qwen2.5-instruct", "llama-3.1-instruct", "deepseek-r1-distill-qwen", "qwen3", "gpt-oss", "phi-4"]


@pytest.mark.parametrize(
    "name", [n for n in NAMES if n in rt.NAMES] + ["zoo:chatml", "zoo:llama3", "zoo:plain"]
)
def test_rows_read_from_ids_are_the_rows_read_from_offsets(name):
    tok = zoo.TEMPLATES[name[4:]][0]() if name.startswith("zoo:") else rt.tokenizer(name)
    encoder = ExampleTokenizer(tok, max_length=24)
    rows = rendered(encoder)
    encoder.encode(rows)  # the first batch is read both ways
    assert encoder.encoder._bytes_trusted is True
    reference = ByOffsets(tok, max_length=24).encode(rows)
    assert encoder.encode(rows) == reference
    flat = [t for rows in reference for t in rows]
    assert any(t.truncated for t in flat) and any(not t.truncated for t in flat)


def test_counts_that_differ_from_offsets_on_the_first_batch_turn_the_reading_off(monkeypatch):
    """A reading that would shift the labels by one token: caught on the first batch, whose rows
    come from offsets, and never used after."""
    tok = chatml()
    encoder = ExampleTokenizer(tok)
    rows = rendered(encoder)
    original = ByteLengths.counts

    def shifted(self, text, ids, pieces):
        counts = original(self, text, ids, pieces)
        return [counts[0] + 1, counts[1] - 1, *counts[2:]] if counts and len(counts) > 1 else counts

    monkeypatch.setattr(ByteLengths, "counts", shifted)
    reference = ByOffsets(tok).encode(rows)
    assert encoder.encode(rows) == reference
    assert encoder.encoder._bytes_trusted is False
    assert encoder.encode(rows) == reference


@pytest.mark.parametrize("used_first", [False, True])
def test_an_encoder_sent_to_another_process_reads_from_ids(used_first):
    """dataset_num_proc sends the encoder to other processes, as prepare() builds it (the table not
    yet built: each process builds its own) or after it has encoded (the table goes with it)."""
    import pickle

    encoder = ExampleTokenizer(chatml())
    if used_first:
        encoder.encode(rendered(encoder))
        assert "_byte_lengths" in vars(encoder.encoder)
    copy_ = pickle.loads(pickle.dumps(encoder))
    rows = rendered(copy_)
    copy_.encode(rows)  # its first batch, checked against offsets where not checked before
    assert copy_.encode(rows) == ByOffsets(chatml()).encode(rows)
    assert copy_.encoder._bytes_trusted is True and copy_.encoder._byte_lengths is not None
