"""The Python API in the current TRL style: ``SFTTrainer(model=..., args=SFTConfig(...), ...)``.

Every test builds a trainer on the built-in tiny Llama, checks the prepared data, trains a few steps
and asserts that the loss is finite and the trainable weights moved.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from datasets import Dataset, DatasetDict
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import ROWS, changed, quick_args, save_tiny_model, trainable_snapshot, trained_text
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainingArguments

from sftrainer import ConfigError, DataError, SFTConfig, SFTTrainer
from sftrainer.config import to_sft_config

END_OF_TURN = "<|im_end|>"
NO_GPU = not torch.cuda.is_available()

# peft 0.21 reads an attribute transformers 5 deprecated (sftrainer silences it in its own calls).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kw})


def assert_masked_like_responses(trainer: SFTTrainer, tokenizer, rows=ROWS) -> None:
    """Each prepared row trains exactly on its response + end of turn; everything else is -100."""
    prepared = trainer.train_dataset
    assert set(prepared.column_names) == {"input_ids", "labels"}
    assert len(prepared) == len(rows)
    for row, raw in zip(prepared, rows):
        assert len(row["input_ids"]) == len(row["labels"])
        trained = [(t, label) for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
        assert all(t == label for t, label in trained)
        assert trained_text(tokenizer, row) == raw["response"] + END_OF_TURN
        # The prompt is in the input but never in the loss.
        assert raw["prompt"] in tokenizer.decode(row["input_ids"])
        assert raw["prompt"] not in trained_text(tokenizer, row)


def train_and_check(trainer: SFTTrainer) -> float:
    """Train; the loss must be finite, every trainable tensor must change, no CPU pin_memory noise."""
    before = trainable_snapshot(trainer.model)
    assert before, "nothing is trainable"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert result.global_step == trainer.args.max_steps
    assert sorted(changed(trainer.model, before)) == sorted(before)
    if NO_GPU:
        assert not [w for w in caught if "pin_memory" in str(w.message)]
    return result.training_loss


def test_model_path_string(tiny_model_dir, tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=SFTConfig(
            output_dir=str(tmp_path), max_length=64, max_steps=3, report_to="none", save_strategy="no"
        ),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    assert isinstance(trainer.model, LlamaForCausalLM)
    assert trainer.data_stats["train data"].kept == len(ROWS)
    assert_masked_like_responses(trainer, tokenizer)
    train_and_check(trainer)


def test_model_path_string_with_lora(tiny_model_dir, tokenizer, tmp_path):
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    assert isinstance(trainer.model, PeftModel)
    trainable = trainable_snapshot(trainer.model)
    assert trainable and all("lora_" in name for name in trainable)
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    assert_masked_like_responses(trainer, tokenizer)
    train_and_check(trainer)
    assert not changed(trainer.model, frozen), "LoRA training changed frozen base weights"


def test_pretrained_model_object_and_no_processing_class(tiny_model, tokenizer, tmp_path):
    # No processing_class: the tokenizer comes from where the model was loaded.
    trainer = SFTTrainer(model=tiny_model, args=quick_args(tmp_path), train_dataset=Dataset.from_list(ROWS))
    assert trainer.model is tiny_model
    assert trainer.processing_class.chat_template == tokenizer.chat_template
    assert_masked_like_responses(trainer, tokenizer)
    train_and_check(trainer)


def test_already_wrapped_peft_model(tiny_model, tokenizer, tmp_path):
    peft_model = get_peft_model(tiny_model, lora(task_type="CAUSAL_LM"))
    trainer = SFTTrainer(
        model=peft_model, args=quick_args(tmp_path), train_dataset=ROWS, processing_class=tokenizer
    )
    assert trainer.model is peft_model
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    train_and_check(trainer)
    assert not changed(peft_model, frozen)


def test_args_none_uses_defaults_named_after_the_model(tiny_model_dir, tokenizer, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = SFTTrainer(model=f"{tiny_model_dir}/", train_dataset=ROWS[:2], processing_class=tokenizer)
    assert isinstance(trainer.args, SFTConfig)
    assert trainer.args.output_dir == f"{tiny_model_dir.name}-sft"
    assert trainer.args.max_length == SFTConfig.max_length
    assert_masked_like_responses(trainer, tokenizer, ROWS[:2])


def test_dataset_dict_test_split_is_the_eval_set(tiny_model_dir, tokenizer, tmp_path):
    data = DatasetDict(train=Dataset.from_list(ROWS[:3]), test=Dataset.from_list(ROWS[3:]))
    trainer = SFTTrainer(
        model=str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=data, processing_class=tokenizer
    )
    assert len(trainer.train_dataset) == 3
    assert len(trainer.eval_dataset) == 1
    assert trained_text(tokenizer, trainer.eval_dataset[0]) == ROWS[3]["response"] + END_OF_TURN
    before = trainer.evaluate()["eval_loss"]
    train_and_check(trainer)
    after = trainer.evaluate()["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after) and after != before


def test_explicit_eval_dataset_wins_over_the_test_split(tiny_model_dir, tokenizer, tmp_path):
    data = DatasetDict(train=Dataset.from_list(ROWS[:2]), test=Dataset.from_list(ROWS[2:]))
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path),
        train_dataset=data,
        eval_dataset=ROWS[:1],
        processing_class=tokenizer,
    )
    assert len(trainer.eval_dataset) == 1
    assert trained_text(tokenizer, trainer.eval_dataset[0]) == ROWS[0]["response"] + END_OF_TURN


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}], ids=["default", "reentrant"])
def test_gradient_checkpointing_with_lora_trains(tiny_model, tokenizer, tmp_path, kwargs):
    # Reentrant checkpointing with frozen embeddings used to cut the graph: no gradient reached LoRA.
    trainer = SFTTrainer(
        model=tiny_model,
        args=quick_args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs),
        train_dataset=ROWS,
        processing_class=tokenizer,
        peft_config=lora(),
    )
    assert trainer.model.config.use_cache is False
    train_and_check(trainer)
    assert tiny_model.is_activation_checkpointing


# ---- precision and config conversion ----------------------------------------------------------


@pytest.mark.skipif(not NO_GPU, reason="the fallback only applies without a GPU")
@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_mixed_precision_without_gpu_warns_once_and_falls_back(tmp_path, flag):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = SFTConfig(output_dir=str(tmp_path), report_to="none", **{flag: True})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert flag in messages[0] and "fp32" in messages[0]
    assert caught[0].filename == __file__, "the warning should point at the caller"
    assert args.bf16 is False and args.fp16 is False


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU defaults")
def test_cpu_defaults_are_quiet(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = SFTConfig(output_dir=str(tmp_path), report_to="none")
    assert [str(w.message) for w in caught] == []
    assert args.bf16 is False and args.fp16 is False
    assert args.dataloader_pin_memory is False


@pytest.mark.parametrize(
    ("dtype", "mixed_precision", "expected"),
    [
        (torch.float16, {}, torch.float32),  # fp16 AdamW on the CPU turns weights to NaN
        (torch.float16, {"fp16": True}, torch.float32),  # the seed: fp16 checkpoint, dtype="auto", fp16=True
        (torch.bfloat16, {"bf16": True}, torch.float32),  # the fallback warning promised fp32
        (torch.bfloat16, {}, torch.float32),  # fp32 master weights, on any hardware (test_precision.py)
    ],
    ids=["fp16", "fp16-fallback", "bf16-fallback", "bf16"],
)
def test_half_precision_checkpoint_on_cpu(tokenizer, tmp_path, dtype, mixed_precision, expected):
    save_tiny_model("llama", tokenizer, tmp_path / "model", dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype="auto")
    assert model.dtype == dtype
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fp16/bf16 -> fp32 note, tested above
        args = quick_args(tmp_path / "run", overwrite_output_dir=True, **mixed_precision)  # trained twice
    trainer = SFTTrainer(model=model, args=args, train_dataset=ROWS, processing_class=tokenizer)
    assert {p.dtype for p in trainer.model.parameters()} == {expected}
    train_and_check(trainer)
    train_and_check(trainer)  # a second run: fp16 AdamW state would have turned the weights to NaN
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


USER_TRAINING_ARGS = dict(
    per_device_train_batch_size=3,
    per_device_eval_batch_size=5,
    gradient_accumulation_steps=4,
    num_train_epochs=2,
    max_steps=7,
    learning_rate=3e-4,
    weight_decay=0.1,
    lr_scheduler_type="cosine",
    warmup_steps=2,
    logging_steps=3,
    eval_strategy="steps",
    eval_steps=5,
    save_strategy="epoch",
    save_total_limit=2,
    seed=123,
    optim="adamw_torch",
    max_grad_norm=0.5,
    report_to="none",
    run_name="my-run",
    remove_unused_columns=False,
)

# Changed on purpose by SFTConfig on a CPU-only machine.
CPU_ADJUSTED = {"dataloader_pin_memory"}


def test_training_arguments_convert_without_warnings_or_lost_values(tmp_path):
    user = TrainingArguments(output_dir=str(tmp_path), **USER_TRAINING_ARGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = to_sft_config(user)
    assert [str(w.message) for w in caught] == []
    assert isinstance(converted, SFTConfig)
    skip = CPU_ADJUSTED if NO_GPU else set()
    lost = {
        f.name: (getattr(user, f.name), getattr(converted, f.name))
        for f in dataclasses.fields(TrainingArguments)
        if f.init and f.name not in skip and getattr(user, f.name) != getattr(converted, f.name)
    }
    assert lost == {}
    assert converted.learning_rate == 3e-4 and converted.max_steps == 7  # not SFTConfig's defaults


@pytest.mark.skipif(not NO_GPU, reason="the fallback only applies without a GPU")
def test_training_arguments_with_fp16_and_checkpointing_convert_with_one_warning(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        user = TrainingArguments(
            output_dir=str(tmp_path), fp16=True, gradient_checkpointing=True, report_to="none"
        )
    caught_by_user = len(caught)  # transformers' own deprecation note for gradient_checkpointing
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = to_sft_config(user)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "fp16" in messages[0], messages
    assert caught_by_user <= 1
    assert converted.fp16 is False and converted.bf16 is False
    assert converted.gradient_checkpointing is True and converted.activation_checkpointing is True


def test_args_of_the_wrong_type_are_a_config_error(tiny_model_dir):
    with pytest.raises(ConfigError, match="args must be SFTConfig or TrainingArguments, got dict"):
        SFTTrainer(model=str(tiny_model_dir), args={"max_length": 64}, train_dataset=ROWS)


# ---- clear errors -----------------------------------------------------------------------------


def test_missing_model_path_names_it(tmp_path, tokenizer):
    missing = str(tmp_path / "no" / "such-model")
    with pytest.raises(ConfigError) as info:
        SFTTrainer(model=missing, args=quick_args(tmp_path), train_dataset=ROWS, processing_class=tokenizer)
    message = str(info.value)
    assert f"'{missing}'" in message and "no such directory" in message
    # Raised `from None`: the user sees one message, not transformers' internals.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_directory_without_a_checkpoint_names_it(tmp_path, tokenizer):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="does not hold a loadable checkpoint") as info:
        SFTTrainer(
            model=str(empty), args=quick_args(tmp_path), train_dataset=ROWS, processing_class=tokenizer
        )
    assert str(empty) in str(info.value)


def test_unreachable_hub_id_names_it(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'no-such-org/no-such-model'.*Hugging Face Hub"):
        SFTTrainer(
            model="no-such-org/no-such-model",
            args=quick_args(tmp_path),
            train_dataset=ROWS,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("peft_confg", "peft_config"), ("max_seq_lenght", "max_seq_length"), ("tokenzier", "tokenizer")],
)
def test_unknown_keyword_is_a_type_error_with_did_you_mean(tiny_model, tmp_path, typo, suggestion):
    with pytest.raises(
        TypeError, match=rf"unexpected keyword argument '{typo}' \(did you mean '{suggestion}'\?\)"
    ):
        SFTTrainer(model=tiny_model, args=quick_args(tmp_path), train_dataset=ROWS, **{typo: 1})


def test_peft_config_on_a_peft_model_is_a_clear_error(tiny_model, tokenizer, tmp_path):
    peft_model = get_peft_model(tiny_model, lora(task_type="CAUSAL_LM"))
    with pytest.raises(ConfigError, match=r"already has a PEFT adapter.*peft_config=None"):
        SFTTrainer(
            model=peft_model,
            args=quick_args(tmp_path),
            train_dataset=ROWS,
            processing_class=tokenizer,
            peft_config=lora(),
        )


def test_no_data_at_all_is_an_error_and_eval_data_alone_is_enough(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        SFTTrainer(model=str(tiny_model_dir), args=quick_args(tmp_path))
    trainer = SFTTrainer(model=str(tiny_model_dir), args=quick_args(tmp_path), eval_dataset=ROWS)
    assert math.isfinite(trainer.evaluate()["eval_loss"])  # as `sftrainer eval` uses it


def test_a_transform_preparation_would_not_see_is_refused(tiny_model_dir, tmp_path):
    def shout(batch):
        return {**batch, "response": [r.upper() for r in batch["response"]]}

    data = Dataset.from_list(ROWS).with_transform(shout)
    with pytest.raises(DataError, match=r"train data: .*Dataset\.with_transform\(\).*skip_prepare_dataset"):
        SFTTrainer(model=str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=data)
    mapped = Dataset.from_list(ROWS).map(shout, batched=True)  # what the message suggests
    trainer = SFTTrainer(model=str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=mapped)
    texts = [trainer.processing_class.decode(r["input_ids"]) for r in trainer.train_dataset]
    assert sum(t.count("PARIS.") for t in texts) == 1


def test_the_model_is_tagged_as_trained_by_sftrainer(tiny_model_dir, tmp_path):
    for peft_config in (None, lora()):
        trainer = SFTTrainer(
            model=str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=ROWS, peft_config=peft_config
        )
        assert {"sft", "sftrainer"} <= set(trainer.model.model_tags) and "trl" not in trainer.model.model_tags


def test_the_tokenizer_loads_at_the_revision_the_model_loads_at(tiny_model_dir, tmp_path, monkeypatch):
    import sftrainer.setup

    seen = []

    def load_tokenizer(path, trust_remote_code=False, revision=None):
        seen.append(revision)
        return AutoTokenizer.from_pretrained(path)

    monkeypatch.setattr(sftrainer.setup, "load_tokenizer", load_tokenizer)
    args = quick_args(tmp_path, model_init_kwargs={"revision": "v1.0"})
    SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS)
    assert seen == ["v1.0"]


def test_model_none_is_an_error(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        SFTTrainer(args=quick_args(tmp_path), train_dataset=ROWS, processing_class=tokenizer)


def test_model_without_a_source_needs_processing_class(tokenizer, tmp_path):
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    with pytest.raises(ValueError, match="pass processing_class="):
        SFTTrainer(model=model, args=quick_args(tmp_path), train_dataset=ROWS)


def test_model_from_auto_class_keeps_working_as_a_plain_trainer(tiny_model_dir, tokenizer, tmp_path):
    """The trainer is a transformers.Trainer: evaluate/predict on the prepared rows work as usual."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path),
        train_dataset=ROWS,
        eval_dataset=ROWS,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
    assert "eval_exact_match" not in metrics  # exact_match_samples defaults to 0


def test_older_keywords_do_not_change_the_callers_config(tiny_model_dir, tmp_path):
    import warnings

    from sftrainer import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path), max_length=64, report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SFTTrainer(
            model=str(tiny_model_dir),
            args=args,
            train_dataset=[{"prompt": "Say hi", "response": "hi"}],
            max_seq_length=32,
        )
    assert trainer.args.max_length == 32
    assert args.max_length == 64


def test_dora_from_config_settings_trains_its_magnitudes(tiny_model_dir, tmp_path):
    from sftrainer.lora import peft_config_from
    from sftrainer.run_config import LoraSettings

    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path),
        train_dataset=ROWS,
        peft_config=peft_config_from(LoraSettings(r=4, alpha=8, use_dora=True)),
    )
    before = trainable_snapshot(trainer.model)
    assert any("lora_magnitude_vector" in name for name in before)  # DoRA's per-column magnitudes
    train_and_check(trainer)
    assert any("lora_magnitude_vector" in name for name in changed(trainer.model, before))


# ---- the caller's objects are not changed; the saved tokenizer is the one trained with ------------

CUSTOM_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ':\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n' }}{% endif %}"
)


def tokenizer_state(tokenizer) -> tuple:
    return tokenizer.chat_template, tokenizer.eos_token, tokenizer.pad_token, len(tokenizer)


def test_callers_config_and_tokenizer_are_unchanged_and_the_saved_tokenizer_is_the_trained_one(
    tiny_model_dir, tokenizer, tmp_path
):
    args = quick_args(tmp_path / "run", packing=True, chat_template=CUSTOM_TEMPLATE, pad_token="<|im_start|>")
    args_before, tokenizer_before = args.to_dict(), tokenizer_state(tokenizer)
    trainer = SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, processing_class=tokenizer)
    assert args.to_dict() == args_before and args.remove_unused_columns is True
    assert trainer.args.remove_unused_columns is False  # packed rows keep position_ids
    assert tokenizer_state(tokenizer) == tokenizer_before
    assert trainer.processing_class is not tokenizer
    assert trainer.data_collator.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert (saved.chat_template, saved.pad_token) == (CUSTOM_TEMPLATE, "<|im_start|>")


def test_tokenizer_without_pad_or_template_is_completed_on_a_copy_and_saved(
    tiny_model_dir, tokenizer, tmp_path
):
    tokenizer.pad_token, tokenizer.chat_template = None, None
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, max_steps=1),
        train_dataset=ROWS,
        processing_class=tokenizer,
    )
    assert (tokenizer.pad_token, tokenizer.chat_template) == (None, None)
    trainer.save_model(str(tmp_path / "final"))
    saved = AutoTokenizer.from_pretrained(tmp_path / "final")
    assert saved.pad_token == "<|im_end|>" and "### Assistant:" in saved.chat_template


def test_the_models_configs_take_the_special_tokens_training_uses(tiny_model_dir, tokenizer, tmp_path):
    # As TRL, at construction: the EOS override heads the generation config's stop tokens (the model's
    # own stay), and a tokenizer without a pad token pads with EOS in the configs too.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    own_eos = model.generation_config.eos_token_id
    no_pad = AutoTokenizer.from_pretrained(tiny_model_dir)
    no_pad.pad_token = None
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, eos_token="<s>"),
        train_dataset=ROWS,
        processing_class=no_pad,
    )
    eos = tokenizer.convert_tokens_to_ids("<s>")
    assert trainer.processing_class.eos_token_id == eos and trainer.processing_class.pad_token_id == eos
    assert model.config.eos_token_id == eos and model.config.pad_token_id == eos
    assert model.generation_config.eos_token_id == [eos, own_eos]
    assert model.generation_config.pad_token_id == eos


def test_eos_token_override_is_the_trained_end_of_sequence(tiny_model_dir, tokenizer, tmp_path):
    rows = [{"prompt": "Say hi. ", "completion": "hi"}]
    trainer = SFTTrainer(
        model=str(tiny_model_dir),
        args=quick_args(tmp_path, eos_token="<s>"),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    assert trained_text(tokenizer, trainer.train_dataset[0]) == "hi<s>"
    assert tokenizer.eos_token == "<|im_end|>"
