"""Vision-language rows: where images come from, how rows holding them are read, the exact loss mask
per family (LLaVA, Idefics3, Gemma 3), truncation around images, packing that keeps each row's images,
and the errors bad image data gets."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
import torch
from datasets import Dataset
from tiny_vlms import FAMILIES, build_processor, image, png_bytes
from transformers import AutoProcessor

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data import prepare as prepare_module
from sftrainer.data.formats import ChatExample, normalise_messages
from sftrainer.data.load import load
from sftrainer.data.prepare import DataSettings, prepare
from sftrainer.data.tokenize import ExampleTokenizer
from sftrainer.errors import ConfigError, DataError, RowError
from sftrainer.vision.collate import VisionCollator
from sftrainer.vision.encode import VisionTokenizer
from sftrainer.vision.images import SENTINEL, image_ref, lift_images, load_image, split_images, with_parts
from sftrainer.vision.model import prepare_processor
from sftrainer.vision.pack import pack_with_images
from sftrainer.vision.processor import CollapsedImages, feature_token_ids

END_OF_TURN = {"llava": "</s>", "idefics3": "<end_of_utterance>", "gemma3": "<end_of_turn>"}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """Each family's processor, saved and loaded back with AutoProcessor, then prepared for training."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_processor(family).save_pretrained(path)
        out[family] = prepare_processor(AutoProcessor.from_pretrained(path))
    return out


@pytest.fixture
def pictures(tmp_path):
    paths = {}
    for colour in ("red", "blue"):
        paths[colour] = tmp_path / f"{colour}.png"
        image(colour).save(paths[colour])
    return paths


def prepare_vision(dataset, processor, settings):
    """What the pipeline does for a processor: the one ``prepare`` with the vision encoder."""
    return prepare(dataset, processor, settings, encoder=VisionTokenizer.for_settings(processor, settings))


def _prep(processor, rows, **settings):
    values = {"max_length": 1024, **settings}
    return prepare_vision(
        load([lift_images(r) for r in rows], "train data"), processor, DataSettings(**values)
    )


def _trained(processor, row) -> str:
    return processor.tokenizer.decode(
        [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    )


TEXT_ONLY = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}


def _chat(first_image, second_text="And the colour?"):
    return [
        {"role": "user", "content": [first_image, {"type": "text", "text": "What is in the picture?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": second_text},
        {"role": "assistant", "content": "Red, of course."},
    ]


# ---- one image ---------------------------------------------------------------------------------


def test_image_refs_from_paths_bytes_pil_and_data_uris(tmp_path, pictures):
    assert image_ref(str(pictures["red"]), "x") == {"bytes": None, "path": str(pictures["red"])}
    assert image_ref("red.png", "x", root=tmp_path)["path"] == str(pictures["red"])  # relative to image_root
    assert image_ref(f"file://{pictures['red']}", "x")["path"] == str(pictures["red"])
    raw = pictures["red"].read_bytes()
    assert image_ref(raw, "x") == {"bytes": raw, "path": None}
    assert image_ref({"bytes": raw, "path": None}, "x")["bytes"] == raw  # datasets' Image storage
    uri = "data:image/png;base64," + base64.b64encode(raw).decode()
    assert image_ref(uri, "x")["bytes"] == raw
    from_pil = image_ref(image("blue"), "x")
    assert load_image(from_pil).size == image("blue").size


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            "https://example.com/cat.png",
            r"field 'messages\[0\]': is a remote URL .*offline.*Download the image",
        ),
        ("no/such.png", r"no such image file: no/such.png \(relative paths are read from"),
        ("data:image/png,abc", "not base64-encoded"),
        (3.5, "must be an image"),
    ],
)
def test_bad_image_values_name_the_field(value, match):
    with pytest.raises(RowError, match=match):
        image_ref(value, "messages[0]")


def test_undecodable_image_bytes_are_a_row_error():
    with pytest.raises(RowError, match="cannot be decoded as an image"):
        load_image({"bytes": b"not a png", "path": None}, "images[0]")


# ---- one row -------------------------------------------------------------------------------------


def test_typed_parts_and_the_images_column_fill_placeholders_in_order(pictures):
    row = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}],
            },
            {
                "role": "assistant",
                "content": [{"type": "image_url", "image_url": {"url": str(pictures["red"])}}],
            },
        ],
        "images": [str(pictures["blue"]), png_bytes(image("red"))],
    }
    text, refs = split_images(row, "images")
    assert [m["content"] for m in text["messages"]] == [f"{SENTINEL}and{SENTINEL}", SENTINEL]
    assert [r["path"] for r in refs] == [str(pictures["blue"]), None, str(pictures["red"])]
    assert "images" in row and isinstance(
        row["messages"][0]["content"], list
    )  # the caller's row is unchanged


def test_string_contents_get_the_images_before_the_first_user_text_as_trl_places_them(pictures):
    row = {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"}],
        "images": [str(pictures["red"]), str(pictures["blue"])],
    }
    text, refs = split_images(row, "images")
    assert text["messages"][1]["content"] == SENTINEL * 2 + "What?" and len(refs) == 2
    prompt, _ = split_images(
        {"prompt": "Describe.", "response": "Red.", "image": str(pictures["red"])}, "image"
    )
    assert prompt["prompt"] == SENTINEL + "Describe."


def test_sharegpt_image_markers_in_the_text_are_used_when_they_match_the_images(pictures):
    row = {
        "conversations": [{"from": "human", "value": "Look: <image> then"}, {"from": "gpt", "value": "Red."}],
        "images": [str(pictures["red"])],
    }
    text, _ = split_images(row, "images")
    assert text["conversations"][0]["value"] == f"Look: {SENTINEL} then"


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (
            {
                "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}],
                "images": ["a"],
            },
            r"field 'images': the row has 1 image\(s\) in 'images' but its messages hold 2 image part",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "video", "video": "v.mp4"}]}]},
            r"messages\[0\].content\[0\].type.*unknown content part type 'video'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            r"messages\[0\].content\[0\].text.*must be a string",
        ),
    ],
)
def test_bad_rows(row, match):
    with pytest.raises(RowError, match=match):
        split_images(row, "images" if "images" in row else None)


def test_bytes_and_pil_images_inside_messages_move_to_the_images_column():
    """Arrow cannot store bytes or PIL images inside free-form message contents."""
    raw = png_bytes(image("red"))
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": raw}, {"type": "image"}]}]}
    row["images"] = [image("blue")]
    lifted = lift_images(row)
    assert lifted["messages"][0]["content"] == [{"type": "image"}, {"type": "image"}]
    assert lifted["images"][0] == {"bytes": raw, "path": None} and lifted["images"][1]["bytes"]


# ---- masks per family ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_exactly_on_the_assistant_text_never_on_an_image_token(processors, family, pictures):
    processor = processors[family]
    rows = [
        {"messages": _chat({"type": "image", "image": str(pictures["red"])})},
        {  # an images column, string contents, an image in the second user turn too
            "messages": _chat({"type": "image"}, [{"type": "image"}, {"type": "text", "text": "And this?"}]),
            "images": [str(pictures["blue"]), png_bytes(image("yellow", (48, 64)))],
        },
    ]
    ds, stats = _prep(processor, rows)
    assert stats.kept == 2 and stats.images == 3
    eot = END_OF_TURN[family]
    space = " " if family in ("llava", "idefics3") else ""  # the template's glue before the answer is trained
    want = f"{space}A red square.{eot}{space}Red, of course.{eot}"
    features = feature_token_ids(processor)
    for row in ds:
        assert _trained(processor, row) == want
        trained = {t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX}
        assert not trained & features
        assert not trained & {
            processor.tokenizer.convert_tokens_to_ids(t) for t in ("<image>", "<start_of_image>")
        }
    assert [len(r) for r in ds["images"]] == [1, 2]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_turns_are_found_from_one_marked_rendering_of_typed_parts(processors, family):
    """Several trained turns are located from one rendering with a marker per turn; the markers are
    text parts (these templates render a plain-string content as nothing, or fail on it), and the
    spans are the ones that rendering each turn on its own finds."""

    class TurnByTurn(ExampleTokenizer):
        def _diff_turns_at_once(self, example, full, turns):
            return None

    tokenizer = processors[family].tokenizer
    turns = [(f"{SENTINEL}What is in the picture?", "A red square."), ("And?", "Red."), ("Sure?", "Yes.")]
    messages = [{"role": r, "content": c} for q, a in turns for r, c in (("user", q), ("assistant", a))]
    example = with_parts(ChatExample(normalise_messages(messages, "messages")))
    fast = ExampleTokenizer(tokenizer)
    full = fast._render(example, example.messages, False)
    assert fast._diff_turns_at_once(example, full, [1, 3, 5]) is not None
    assert fast.render(example) == TurnByTurn(tokenizer).render(example)


@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_the_ids_are_the_processors_own(processors, family, pictures):
    """The expanded conversation is tokenized in one piece, so the ids are what the processor gives for
    the same text and images (families whose templates close turns with their own token)."""
    processor = processors[family]
    messages = _chat({"type": "image"})
    ds, _ = _prep(processor, [{"messages": messages, "images": [str(pictures["red"])]}])
    parts = [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in messages
    ]
    text = processor.apply_chat_template(parts, tokenize=False)
    ids = processor(
        text=[text], images=[[load_image({"path": str(pictures["red"])})]], add_special_tokens=False
    )
    assert ds[0]["input_ids"] == ids["input_ids"][0]


def test_idefics3_tiles_give_each_image_its_own_token_count(processors, pictures):
    """Idefics3 splits an image into tiles (+ the whole image): a wide image has fewer tiles than a square one."""
    processor = processors["idefics3"]
    rows = [
        {"messages": _chat({"type": "image"}), "images": [image("red", size)]}
        for size in ((64, 32), (64, 64))
    ]
    ds, _ = _prep(processor, rows)
    features = feature_token_ids(processor)
    counts = [sum(t in features for t in ids) for ids in ds["input_ids"]]
    assert counts[0] < counts[1]


def test_text_only_rows_train_with_a_vision_processor(processors):
    ds, stats = _prep(processors["llava"], [{"prompt": "Hi", "response": "Hello."}])
    assert (
        _trained(processors["llava"], ds[0]) == " Hello.</s>" and ds[0]["images"] == [] and stats.images == 0
    )


# ---- truncation ----------------------------------------------------------------------------------


def test_truncation_never_cuts_through_an_image(processors, pictures):
    processor = processors["llava"]
    rows = [{"messages": _chat({"type": "image"}), "images": [str(pictures["red"])]}]
    full = len(_prep(processor, rows)[0][0]["input_ids"])
    ds, stats = _prep(processor, rows, max_length=full - 5)  # cuts the last answer: truncated, kept
    assert stats.truncated == 1 and stats.kept == 1 and len(ds[0]["input_ids"]) == full - 5
    with pytest.raises(DataError, match="no row has any token") as info:
        _prep(processor, rows, max_length=10)  # inside the image's 16 tokens: dropped, counted
    assert "1 dropped: max_length=10 would cut through an image's tokens" in str(info.value)
    keep_end = _prep(processor, rows * 2 + [TEXT_ONLY], max_length=10, truncation_mode="keep_end")
    assert keep_end[1].dropped_image_cut == 2 and keep_end[1].kept == 1


# ---- bad input through prepare -------------------------------------------------------------------


def test_bad_image_rows_are_listed_with_their_row_numbers(processors, pictures, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    good = {"messages": _chat({"type": "image"}), "images": [str(pictures["red"])]}
    rows = [
        good,
        {"messages": _chat({"type": "image"}), "images": [str(tmp_path / "missing.png")]},
        {"messages": _chat({"type": "image"}), "images": [str(tmp_path / "broken.png")]},
        {"messages": _chat({"type": "image"}), "images": []},
        {"messages": _chat({"type": "image_url", "image_url": {"url": "http://x.org/a.png"}})},
    ]
    with pytest.raises(DataError) as info:
        _prep(processors["llava"], rows)
    text = str(info.value)
    assert "4 of 5 rows cannot be used" in text
    assert f"row 2: field 'images[0]': no such image file: {tmp_path / 'missing.png'}" in text
    assert "row 3: field 'images[0] (" in text and "cannot be decoded as an image" in text
    assert "row 4: field 'images': the row has 0 image(s)" in text
    assert "row 5: field 'messages[0].content[0]': is a remote URL" in text
    ds, stats = _prep(processors["llava"], rows, skip_invalid_rows=True)
    assert stats.dropped_invalid == 4 and stats.kept == 1 and len(ds) == 1


def test_a_literal_placeholder_in_the_text_is_refused(processors, pictures):
    row = {"messages": _chat({"type": "image"}, "What is <image>?"), "images": [str(pictures["red"])]}
    with pytest.raises(DataError, match=r"renders 2 image placeholder\(s\) '<image>' for the row's 1 image"):
        _prep(processors["llava"], [row])


def test_pretokenized_rows_cannot_carry_images(processors):
    with pytest.raises(DataError, match="pre-tokenized rows"):
        prepare_vision(Dataset.from_list([{"input_ids": [1, 2]}]), processors["llava"], DataSettings())


# ---- packing and batches -------------------------------------------------------------------------


def test_packing_keeps_each_rows_images_in_token_order(processors, pictures):
    processor = processors["llava"]
    rows = [
        {"messages": _chat({"type": "image"}, f"And {k}?"), "images": [str(pictures[c])]}
        for k, c in enumerate(("red", "blue", "red"))
    ] + [TEXT_ONLY]
    ds, _ = _prep(processor, rows)
    packed, stats = pack_with_images(ds, max_length=120)
    assert stats.rows == 4 and stats.sequences < 4 and sum(len(r) for r in packed["images"]) == 3
    for row in packed:  # the images of each sequence are those of its rows, in the rows' order
        starts = [k for k, p in enumerate(row["position_ids"]) if p == 0]
        pieces = [row["input_ids"][a:b] for a, b in zip(starts, [*starts[1:], None])]
        originals = {tuple(r["input_ids"]): r["images"] for r in ds}
        assert row["images"] == [ref for piece in pieces for ref in originals[tuple(piece)]]
    with pytest.raises(ConfigError, match="packing_strategy='bfd_split' splits rows"):
        pack_with_images(ds, max_length=120, strategy="bfd_split")


@pytest.mark.parametrize("family", FAMILIES)
def test_collator_gives_pixel_inputs_and_type_ids(processors, family, pictures):
    processor = processors[family]
    rows = [{"messages": _chat({"type": "image"}), "images": [str(pictures["red"])]}, TEXT_ONLY]
    ds, _ = _prep(processor, rows)
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert "pixel_values" in batch
    if family == "gemma3":  # bidirectional attention inside images reads token_type_ids
        features = torch.tensor(sorted(feature_token_ids(processor)))
        assert torch.equal(batch["token_type_ids"], torch.isin(batch["input_ids"], features).long())
    flat = VisionCollator(processor, processor.tokenizer.pad_token_id, by_position=True, flatten=True)(
        [ds[0], ds[1]]
    )
    assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat


def test_settings_problems_are_config_errors(processors):
    bad = dataclasses.replace(DataSettings(), train_on="assistant")
    with pytest.raises(ConfigError, match="train_on"):
        prepare_vision(Dataset.from_list([{"prompt": "a", "response": "b"}]), processors["llava"], bad)


def test_a_processor_without_any_chat_template_gets_a_default_that_renders_images(tmp_path, pictures):
    processor = build_processor("llava")
    processor.chat_template = None
    processor.tokenizer.chat_template = None
    prepared = prepare_processor(processor)
    assert processor.chat_template is None and prepared.chat_template  # a copy got the default
    ds, _ = _prep(prepared, [{"messages": _chat({"type": "image"}), "images": [str(pictures["red"])]}])
    assert _trained(prepared, ds[0]) == "A red square.</s>Red, of course.</s>"
    shown = CollapsedImages(prepared).decode(ds[0]["input_ids"])  # as sftrainer data shows it
    assert shown.startswith("<s>### User:\n<image>×16What is in the picture?\n\n### Assistant:\n")


# ---- the prepared-data cache -------------------------------------------------------------------


def test_a_second_preparation_reads_the_cache_and_overwrite_cache_prepares_again(
    processors, pictures, tmp_path, monkeypatch
):
    """As for text rows (tests/data/test_cache.py): the key leaves out the number of processes, and
    ``overwrite_cache`` is not ignored for image rows."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "rows.jsonl"
    rows = [{"messages": _chat({"type": "image", "image": str(pictures["red"])})} for _ in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    original = prepare_module._TokenizeBatch.__call__
    monkeypatch.setattr(
        prepare_module._TokenizeBatch,
        "__call__",
        lambda self, b, i: calls.append(len(i)) or original(self, b, i),
    )

    def run(**settings):
        data = load(str(path), "train data")
        return prepare_vision(data, processors["llava"], DataSettings(max_length=1024, **settings))[0]

    first = run()
    assert sum(calls) == 6
    calls.clear()
    assert run(num_proc=1).to_list() == first.to_list() and calls == []
    forced = run(overwrite_cache=True)
    assert sum(calls) == 6 and forced.to_list() == first.to_list()
