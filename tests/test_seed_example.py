"""The user's example code (shared/seed/sfttrainer-seed.txt), run as written on CPU.

Only three things differ from the seed: the local tiny model replaces "meta-llama/Llama-2-7b-hf",
``max_steps`` keeps the run to seconds, and the "Evaluation" snippet drops ``.cuda()``. Everything
else, including ``fp16=True``, ``tokenizer=``, ``dataset_text_field="prompt"`` and
``max_seq_length=512``, is the seed's own code.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from tiny_models import changed, trainable_snapshot, trained_text
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftrainer import SFTTrainer

EXAMPLES = [
    {"prompt": "What is the capital of France?", "response": "Paris."},
    {"prompt": "Who wrote Hamlet?", "response": "William Shakespeare."},
]
NO_GPU = not torch.cuda.is_available()

# peft 0.21 reads an attribute transformers 5 deprecated; only the test's own PeftModel call hits it
# (sftrainer silences it, and assert_older_style_warnings records with "always" to check that).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]


def seed_training_args() -> TrainingArguments:
    # Step 3 of the seed, plus max_steps so the "3 epochs" take two optimizer steps.
    return TrainingArguments(
        output_dir="./llama2-finetuned",
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        num_train_epochs=3,
        logging_steps=10,
        save_strategy="epoch",
        fp16=True,
        report_to="none",  # or "wandb"
        max_steps=2,
    )


def run_recording_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, caught


def assert_older_style_warnings(caught: list[warnings.WarningMessage]) -> None:
    """One FutureWarning naming the current spelling; one fp16 -> fp32 note without a GPU; no other
    warning from sftrainer, and no pin_memory noise."""
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(future) == 1, [str(w.message) for w in future]
    message = str(future[0].message)
    assert "older TRL style" in message
    for spelling in ("processing_class=", "dataset_text_field", "max_length"):
        assert spelling in message
    assert future[0].filename == __file__, "the FutureWarning should point at the user's call"
    fp16 = [w for w in caught if "fp16" in str(w.message)]
    if NO_GPU:
        assert len(fp16) == 1, [str(w.message) for w in fp16]
        assert issubclass(fp16[0].category, UserWarning) and "fp32" in str(fp16[0].message)
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    others = [w for w in caught if w not in future and w not in fp16]
    assert others == [], [f"{w.category.__name__}: {w.message}" for w in others]


def test_seed_example_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the seed writes to ./llama2-finetuned and ./llama2-alpaca-lora

    # Step 1: Load Model and Tokenizer
    model_name = str(tiny_model_dir)  # "meta-llama/Llama-2-7b-hf"
    tokenizer = AutoTokenizer.from_pretrained(model_name, use_fast=True)
    model = AutoModelForCausalLM.from_pretrained(model_name, torch_dtype="auto")

    # Step 2: Prepare Dataset
    dataset = Dataset.from_list(EXAMPLES)

    # Step 3: Define SFTTrainer
    training_args = seed_training_args()
    trainer, caught = run_recording_warnings(
        lambda: SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=dataset,
            dataset_text_field="prompt",  # automatically formats prompt+response
            max_seq_length=512,
            args=training_args,
        )
    )
    assert trainer.args.max_length == 512
    assert trainer.args.fp16 is (not NO_GPU)
    # "formats prompt+response": the prompt is in the input, the loss is on the response only.
    for row, example in zip(trainer.train_dataset, EXAMPLES):
        assert example["prompt"] in tokenizer.decode(row["input_ids"])
        assert trained_text(tokenizer, row) == example["response"] + "<|im_end|>"

    # Step 4: Train the Model
    before = trainable_snapshot(model)
    result, caught_in_train = run_recording_warnings(trainer.train)
    assert_older_style_warnings(caught + caught_in_train)
    assert math.isfinite(result.training_loss)
    assert result.global_step == 2
    assert sorted(changed(model, before)) == sorted(before)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # save_strategy="epoch" wrote a checkpoint
    assert (Path("llama2-finetuned") / "checkpoint-2" / "model.safetensors").is_file()
    finetuned = copy.deepcopy(model)

    # Example with LoRA (Parameter-Efficient Fine-Tuning), on the same model and arguments
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    trainer, caught = run_recording_warnings(
        lambda: SFTTrainer(
            model=model,
            tokenizer=tokenizer,
            train_dataset=dataset,
            dataset_text_field="prompt",
            peft_config=lora_config,  # apply LoRA
            max_seq_length=512,
            args=training_args,
        )
    )
    assert isinstance(trainer.model, PeftModel)
    before = trainable_snapshot(trainer.model)
    assert before and all("lora_" in name for name in before)
    result, caught_in_train = run_recording_warnings(trainer.train)
    assert_older_style_warnings(caught + caught_in_train)
    assert math.isfinite(result.training_loss)
    assert sorted(changed(trainer.model, before)) == sorted(before)

    # Evaluation (on CPU: the seed's .cuda() dropped)
    prompt = "List three benefits of exercise."
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(input_ids, max_new_tokens=50)
    assert output.shape[0] == 1 and input_ids.shape[1] < output.shape[1] <= input_ids.shape[1] + 50
    assert torch.equal(output[0, : input_ids.shape[1]], input_ids[0])
    assert isinstance(tokenizer.decode(output[0], skip_special_tokens=True), str)

    # Save Model for Later Use
    trainer.save_model("./llama2-alpaca-lora")
    tokenizer.save_pretrained("./llama2-alpaca-lora")
    saved = Path("llama2-alpaca-lora")
    assert (saved / "adapter_model.safetensors").is_file()
    assert (saved / "adapter_config.json").is_file()
    assert not (saved / "model.safetensors").exists()
    # Run as one script, the seed applies LoRA to the model Step 4 already fine-tuned, so the adapter
    # belongs on that model, not on the original checkpoint its config names.
    reloaded = PeftModel.from_pretrained(finetuned, saved).eval()
    trainer.model.eval()
    ids = trainer.train_dataset[0]["input_ids"]
    with torch.no_grad():
        expected = trainer.model(torch.tensor([ids])).logits
        torch.testing.assert_close(reloaded(torch.tensor([ids])).logits, expected)
    assert AutoTokenizer.from_pretrained(saved).chat_template == tokenizer.chat_template


@pytest.mark.parametrize("text_field", ["prompt", None])
def test_prompt_response_rows_train_on_the_response(tiny_model, tokenizer, tmp_path, text_field):
    """With or without the seed's dataset_text_field="prompt", the response is what is learned."""
    kwargs = {"dataset_text_field": text_field} if text_field else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SFTTrainer(
            model=tiny_model,
            tokenizer=tokenizer,
            train_dataset=Dataset.from_list(EXAMPLES),
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
            **kwargs,
        )
    texts = [trained_text(tokenizer, row) for row in trainer.train_dataset]
    assert texts == [e["response"] + "<|im_end|>" for e in EXAMPLES]


def test_text_field_other_than_prompt_trains_on_all_of_it(tiny_model, tokenizer, tmp_path):
    rows = [{"text": "Paris is the capital of France.", "prompt": "unused"}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        trainer = SFTTrainer(
            model=tiny_model,
            tokenizer=tokenizer,
            train_dataset=rows,
            dataset_text_field="text",
            args=TrainingArguments(output_dir=str(tmp_path), report_to="none"),
        )
    assert trained_text(tokenizer, trainer.train_dataset[0]) == rows[0]["text"] + "<|im_end|>"
