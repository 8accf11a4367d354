"""SFTTrainer on vision-language models (tiny LLaVA, Idefics3 and Gemma 3 built locally): loading a
checkpoint directory with its processor, what trains (the language model; the vision tower and
projector only when asked), save / reload with plain transformers + peft, packing equivalence, and
what is refused."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import changed, quick_args, trainable_snapshot
from tiny_vlms import FAMILIES, image, save_tiny_vlm
from transformers import AutoModelForImageTextToText, AutoProcessor

from sftrainer import SFTTrainer
from sftrainer.constants import IGNORE_INDEX
from sftrainer.errors import ConfigError, ContaminationError, DataError
from sftrainer.vision.collate import VisionCollator
from sftrainer.vision.model import packing_problem, vision_parts

pytestmark = pytest.mark.slow

QUESTIONS = (
    "What is in the picture?",
    "Describe the image.",
    "What colour is the shape?",
    "Count the shapes.",
)


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory):
    return {family: save_tiny_vlm(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def _rows(n: int = 8) -> list[dict]:
    colours, shapes = ("red", "green", "blue", "yellow"), ("square", "circle")
    return [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[k % 4]}]},
                {"role": "assistant", "content": f"A {colours[k % 4]} {shapes[k // 4 % 2]}."},
            ],
            "images": [image(colours[k % 4], (32 + 8 * (k % 3), 32), shapes[k // 4 % 2])],
        }
        for k in range(n)
    ]


def _args(tmp_path, **overrides):
    values = dict(max_length=512, max_steps=4, per_device_train_batch_size=4, logging_steps=1)
    return quick_args(tmp_path / "out", **{**values, **overrides})


def _lora(**extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", **extra)


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


# ---- loading --------------------------------------------------------------------------------------


def test_a_llava_directory_loads_with_its_processor(vlm_dirs, tmp_path):
    """SFTTrainer(model=<LLaVA dir>) used to fail: AutoModelForCausalLM does not know LlavaConfig."""
    trainer = SFTTrainer(model=str(vlm_dirs["llava"]), args=_args(tmp_path), train_dataset=_rows(4))
    assert type(trainer.model).__name__ == "LlavaForConditionalGeneration"
    assert type(trainer.processing_class).__name__ == "LlavaProcessor"
    assert set(trainer.train_dataset.column_names) == {"input_ids", "labels", "images"}
    assert isinstance(trainer.data_collator, VisionCollator)


def test_trl_style_processing_class_is_used_and_left_alone(vlm_dirs, tmp_path):
    processor = AutoProcessor.from_pretrained(vlm_dirs["gemma3"])
    template = processor.chat_template
    model = AutoModelForImageTextToText.from_pretrained(vlm_dirs["gemma3"])
    trainer = SFTTrainer(
        model=model, args=_args(tmp_path), train_dataset=_rows(4), processing_class=processor
    )
    assert trainer.processing_class.tokenizer.chat_template == template
    assert processor.chat_template == template  # the caller's processor is as it was


# ---- what trains ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_the_language_model_only_and_the_loss_falls(vlm_dirs, tmp_path, family):
    args = _args(tmp_path, learning_rate=2e-2, max_steps=6)
    trainer = SFTTrainer(model=str(vlm_dirs[family]), args=args, train_dataset=_rows(8), peft_config=_lora())
    parts = vision_parts(trainer.model.get_base_model())
    before = trainable_snapshot(trainer.model)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trainer.train()
    moved = changed(trainer.model, before)
    assert moved and all("lora_" in n and f".{parts.language}." in n for n in moved), moved
    assert not changed(trainer.model, frozen)
    losses = _losses(trainer)
    assert losses[-1] < losses[0]
    targets = trainer.model.peft_config["default"].target_modules
    assert all(not re.fullmatch(targets, n) for tower in parts.vision_tower for n in _names(trainer, tower))


def _names(trainer, prefix):
    base = trainer.model.get_base_model()
    return [n for n, m in base.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]


def test_full_fine_tune_freezes_the_vision_tower_and_projector_unless_asked(vlm_dirs, tmp_path):
    args = _args(tmp_path, learning_rate=1e-3, max_steps=2)
    trainer = SFTTrainer(model=str(vlm_dirs["llava"]), args=args, train_dataset=_rows(4))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = changed(trainer.model, before)
    assert moved and all(n.startswith(("model.language_model.", "lm_head.")) for n in moved)
    assert {n for n in before if n.startswith("model.language_model.layers.")} <= set(moved)

    args = _args(
        tmp_path / "all", learning_rate=1e-3, max_steps=2, train_projector=True, train_vision_tower=True
    )
    trainer = SFTTrainer(model=str(vlm_dirs["llava"]), args=args, train_dataset=_rows(4))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = set(changed(trainer.model, before))
    assert any(n.startswith("model.multi_modal_projector.") for n in moved)
    assert any(n.startswith("model.vision_tower.encoder.") for n in moved)


def test_lora_with_the_projector_trains_it_in_full_and_saves_it(vlm_dirs, tmp_path):
    args = _args(tmp_path, learning_rate=1e-2, max_steps=2, train_projector=True)
    trainer = SFTTrainer(
        model=str(vlm_dirs["idefics3"]), args=args, train_dataset=_rows(4), peft_config=_lora()
    )
    before = trainable_snapshot(trainer.model)
    trainer.train()
    moved = changed(trainer.model, before)
    assert any(".connector." in n and "modules_to_save" in n for n in moved)
    assert not any(".vision_model." in n for n in moved)
    trainer.save_model(str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert saved["modules_to_save"] == ["model.connector"]


# ---- save and reload -------------------------------------------------------------------------------


def _logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_saved_adapter_and_processor_reload_with_plain_transformers_and_peft(vlm_dirs, tmp_path, family):
    args = _args(tmp_path, learning_rate=1e-2, max_steps=2)
    trainer = SFTTrainer(model=str(vlm_dirs[family]), args=args, train_dataset=_rows(4), peft_config=_lora())
    trainer.train()
    run = tmp_path / "run"
    trainer.save_model(str(run))
    processor = AutoProcessor.from_pretrained(run)
    assert processor.chat_template == trainer.processing_class.chat_template
    base = AutoModelForImageTextToText.from_pretrained(vlm_dirs[family], dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, run).eval()
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)(
        [trainer.train_dataset[i] for i in range(2)]
    )
    trainer.model.eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(trainer.model, batch), atol=1e-5, rtol=1e-5)


def test_a_full_fine_tune_reloads_with_auto_model_for_image_text_to_text(vlm_dirs, tmp_path):
    trainer = SFTTrainer(
        model=str(vlm_dirs["idefics3"]), args=_args(tmp_path, max_steps=1), train_dataset=_rows(4)
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "run"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "run").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "run")
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)([trainer.train_dataset[0]])
    trainer.model.eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(trainer.model, batch), atol=1e-5, rtol=1e-5)


# ---- packing -------------------------------------------------------------------------------------


def _per_token_losses(model, batch) -> torch.Tensor:
    logits = _logits(model, batch)[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses[labels.reshape(-1) != IGNORE_INDEX]


@pytest.mark.parametrize("family", ["llava", "idefics3"])
@pytest.mark.parametrize("layout", ["packing", "padding_free"])
def test_packed_rows_with_images_give_the_losses_of_each_row_alone(vlm_dirs, tmp_path, family, layout):
    """Per-token losses (fp32) of rows packed with their images equal those of each row alone, 1e-5."""
    rows = _rows(6)
    flags = {"packing": True} if layout == "packing" else {"padding_free": True}
    trainer = SFTTrainer(model=str(vlm_dirs[family]), args=_args(tmp_path, **flags), train_dataset=rows)
    trainer.check_packed_isolation()  # what train() runs first
    model, collator, ds = trainer.model.eval(), trainer.data_collator, trainer.train_dataset
    assert collator.by_position and collator.flatten == (layout == "padding_free")
    together = _per_token_losses(model, collator([ds[i] for i in range(len(ds))]))
    alone_collator = VisionCollator(trainer.processing_class, collator.pad_token_id)
    if layout == "packing":
        assert len(ds) < len(rows)
        singles = SFTTrainer(model=model, args=_args(tmp_path), train_dataset=rows).train_dataset
        by_ids = {tuple(r["input_ids"]): r for r in singles}
        order = []
        for row in ds:
            starts = [k for k, p in enumerate(row["position_ids"]) if p == 0]
            order += [by_ids[tuple(row["input_ids"][a:b])] for a, b in zip(starts, [*starts[1:], None])]
    else:
        order = [ds[i] for i in range(len(ds))]
    alone = torch.cat([_per_token_losses(model, alone_collator([r])) for r in order])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    difference = (together - alone).abs().max().item()
    print(f"{family} {layout}: {together.numel()} trained tokens, max |difference| {difference:.2e}")


def test_packing_trains_with_gradient_checkpointing(vlm_dirs, tmp_path):
    args = _args(tmp_path, packing=True, learning_rate=1e-2, activation_checkpointing=True)
    trainer = SFTTrainer(model=str(vlm_dirs["llava"]), args=args, train_dataset=_rows(8), peft_config=_lora())
    assert trainer.pack_stats["train data"].sequences < 8
    trainer.train()
    assert trainer.state.global_step == 4


def test_gemma3_packing_is_refused_before_any_step(vlm_dirs, tmp_path):
    """Gemma 3 attends bidirectionally within images (token_type_ids); transformers' masks do not keep
    that inside packed rows, which the isolation check finds, so the run stops before training."""
    trainer = SFTTrainer(
        model=str(vlm_dirs["gemma3"]), args=_args(tmp_path, packing=True), train_dataset=_rows(8)
    )
    with pytest.raises(
        ContaminationError, match=r"attends bidirectionally within each image \(token_type_ids\)"
    ):
        trainer.train()
    assert trainer.state.global_step == 0


def test_families_that_compute_positions_from_the_image_grid_are_refused():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
                     "intermediate_size": 64, "num_key_value_heads": 1,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2},
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config)
    assert "M-RoPE" in packing_problem(model)


# ---- refused -------------------------------------------------------------------------------------


def test_images_for_a_text_model_are_refused(tiny_model_dir, tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi."}],
            "images": [],
        }
    ]
    with pytest.raises(DataError, match="not a vision-language model"):
        SFTTrainer(model=str(tiny_model_dir), args=_args(tmp_path), train_dataset=rows)


def test_generation_eval_is_refused_for_a_vlm(vlm_dirs, tmp_path):
    with pytest.raises(
        ConfigError, match="exact_match_samples: generation-based evaluation does not pass images"
    ):
        SFTTrainer(
            model=str(vlm_dirs["llava"]), args=_args(tmp_path, exact_match_samples=4), train_dataset=_rows(2)
        )


# ---- generate and chat ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava_run(vlm_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("llava_run")
    trainer = SFTTrainer(
        model=str(vlm_dirs["llava"]),
        args=_args(root, max_steps=2),
        train_dataset=_rows(4),
        peft_config=_lora(),
    )
    trainer.train()
    trainer.save_model(str(root / "run"))
    return root / "run", trainer


def test_the_generation_prompt_is_the_training_prompt(llava_run, tmp_path):
    """What generate feeds the model for a question with an image is exactly the untrained prefix
    training gave the model before its answer."""
    from sftrainer.vision.collate import prompt_inputs

    _, trainer = llava_run
    path = tmp_path / "red.png"
    image("red").save(path)
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    row = {"messages": [*question, {"role": "assistant", "content": "A red square."}], "images": [str(path)]}
    prepared = trainer.data_pipeline([row], "one row", False)[0]
    first_trained = next(k for k, lab in enumerate(prepared["labels"]) if lab != IGNORE_INDEX)
    inputs = prompt_inputs(trainer.processing_class, question, [str(path)])
    assert inputs["input_ids"][0].tolist() == prepared["input_ids"][:first_trained]
    assert inputs["pixel_values"].shape[0] == 1


def test_generate_and_chat_with_an_image(llava_run, tmp_path):
    import io

    from sftrainer.generate import chat, generate, load_for_inference

    run, _ = llava_run
    path = tmp_path / "blue.png"
    image("blue", shape="circle").save(path)
    model, processor = load_for_inference(run)
    messages = [{"role": "user", "content": "What is in the picture?"}]
    reply = generate(model, processor, messages, max_new_tokens=6, images=[str(path)])
    assert isinstance(reply, str)
    lines = iter([f"/image {path}", "What colour?", "And the shape?"])
    out = io.StringIO()
    history = chat(model, processor, lambda: _next(lines), out, max_new_tokens=4)
    assert "(image attached to your next message" in out.getvalue()
    assert history[0]["content"][0] == {"type": "image"} and history[2]["content"] == "And the shape?"


def test_cli_generate_takes_an_image(llava_run, tmp_path, capsys):
    from sftrainer.cli import main

    run, _ = llava_run
    path = tmp_path / "red.png"
    image("red").save(path)
    code = main(
        ["generate", str(run), "--prompt", "What is it?", "--image", str(path), "--max-new-tokens", "4"]
    )
    assert code == 0
    code = main(["generate", str(run), "--prompt", "What is it?", "--image", str(tmp_path / "nope.png")])
    assert code == 2 and "no such image file" in capsys.readouterr().err


def _next(lines):
    try:
        return next(lines)
    except StopIteration:
        raise EOFError from None


def test_sftrainer_data_shows_each_image_once(capsys, monkeypatch):
    from pathlib import Path

    from sftrainer.cli import main

    monkeypatch.chdir(
        Path(__file__).resolve().parents[1]
    )  # the config's paths are relative to the repository
    assert main(["data", "configs/vlm-lora.yaml", "--rows", "2"]) == 0
    out = capsys.readouterr().out
    assert "<image>×16" in out and "<image><image>" not in out
    assert "images: " in out and "format: messages, chat template, images" in out
    assert "ASSISTANT:⟦ " in out or "ASSISTANT:[[ " in out


def test_merge_gives_a_model_auto_model_for_image_text_to_text_loads(llava_run, tmp_path):
    from sftrainer.export import merge

    run, trainer = llava_run
    out = merge(run, tmp_path / "merged")
    merged = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    batch = VisionCollator(processor, processor.tokenizer.pad_token_id)([trainer.train_dataset[0]])
    adapter = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(trainer.model.name_or_path), run
    )
    torch.testing.assert_close(_logits(merged, batch), _logits(adapter.eval(), batch), atol=1e-5, rtol=1e-5)
    assert "AutoModelForImageTextToText" in (out / "README.md").read_text()


def test_sftrainer_eval_on_a_vlm_run(llava_run, tmp_path, capsys):
    from sftrainer.cli import main

    run, _ = llava_run
    picture = tmp_path / "red.png"
    image("red").save(picture)
    row = {"messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "Red."}]}
    data = tmp_path / "eval.jsonl"
    data.write_text(json.dumps({**row, "images": [str(picture)]}) + "\n")
    assert main(["eval", str(run), str(data), f"output_dir={tmp_path / 'eval'}"]) == 0
    assert "eval_loss" in capsys.readouterr().out


# ---- TRL's layout and TRL's behaviour ------------------------------------------------------------


def test_trl_layout_messages_with_typed_parts_and_an_image_feature_column(vlm_dirs, tmp_path):
    from datasets import Dataset

    messages = [
        [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        ]
        for q in QUESTIONS
    ]
    ds = Dataset.from_dict({"messages": messages, "images": [[image("red")] for _ in QUESTIONS]})
    assert type(ds.features["images"].feature).__name__ == "Image"  # decoded to PIL by datasets
    trainer = SFTTrainer(model=str(vlm_dirs["idefics3"]), args=_args(tmp_path, max_steps=1), train_dataset=ds)
    assert all(ref["bytes"] for refs in trainer.train_dataset["images"] for ref in refs)
    trainer.train()


def test_trl_vision_collator_trains_image_tokens_where_sftrainer_trains_none(vlm_dirs, tmp_path):
    """What TRL 1.16 does with the same row and processor (README, "Vision-language models")."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    processor = AutoProcessor.from_pretrained(vlm_dirs["idefics3"])
    row = {
        "messages": [
            {"role": "user", "content": "What is it?"},
            {"role": "assistant", "content": "A red square."},
        ],
        "images": [image("red")],
    }
    image_id = processor.image_token_id
    trl = DataCollatorForVisionLanguageModeling(processor)([dict(row)])
    assert (
        (trl["labels"] != IGNORE_INDEX) & (trl["input_ids"] == image_id)
    ).sum() > 0  # image tokens trained
    assistant_only = DataCollatorForVisionLanguageModeling(processor, assistant_only_loss=True)([dict(row)])
    assert (assistant_only["labels"] != IGNORE_INDEX).sum() == 0  # no {% generation %}: nothing trained
    ours = SFTTrainer(
        model=str(vlm_dirs["idefics3"]), args=_args(tmp_path), train_dataset=[row]
    ).train_dataset[0]
    trained = [t for t, lab in zip(ours["input_ids"], ours["labels"]) if lab != IGNORE_INDEX]
    assert (
        image_id not in trained and processor.tokenizer.decode(trained) == " A red square.<end_of_utterance>"
    )


def test_a_streamed_data_set_with_images_trains(vlm_dirs, tmp_path):
    from sftrainer.data.load import load
    from sftrainer.vision.images import lift_images

    stream = load([lift_images(r) for r in _rows(4)], "rows").to_iterable_dataset()
    trainer = SFTTrainer(
        model=str(vlm_dirs["llava"]), args=_args(tmp_path, max_steps=2), train_dataset=stream
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_sftrainer_train_runs_the_shipped_vlm_config(tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from sftrainer.cli import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    out = tmp_path / "run"
    assert main(["train", "configs/vlm-lora.yaml", f"output_dir={out}", "max_steps=3"]) == 0
    for name in (
        "adapter_model.safetensors",
        "adapter_config.json",
        "processor_config.json",
        "chat_template.jinja",
    ):
        assert (out / name).is_file(), name
    assert "pipeline_tag: image-text-to-text" in (out / "README.md").read_text()
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_loss"] < results["eval_before_loss"]
    preview = json.loads((out / "masking_preview.json").read_text())
    assert any("<image>×16" in span["text"] for row in preview for span in row)
