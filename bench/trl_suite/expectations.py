"""Which of TRL's tests the harness counts, and which failures are documented, deliberate differences.

Keys are test names (``Class::test[params]``), or ``fnmatch`` patterns (``Class::test_*``).

NOT_COUNTED: tests outside the public, CPU-runnable SFT API, each with the reason. They are
deselected (``--all`` runs them anyway).

NEWER_THAN_TRL: tests that TRL 1.16.0 itself fails on this harness (``run.py --against trl``), because
they check behaviour added to TRL after the 1.16.0 release (the test file the harness was built with
is a later revision of ``tests/test_sft_trainer.py``). They run, and sftrainer's outcome is shown, but
they are not counted.

The rest are the "public-API tests". DOCUMENTED: counted tests that fail against sftrainer because
sftrainer deliberately behaves otherwise; each names the row of README's "Different, on purpose" table
that says so. The harness reports them apart from failures, and says so when one of them passes.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

VISION = (
    "vision-language stand-ins are not built (11 architectures with image processors; the Qwen2-VL "
    "family's processors need torchvision, not installed); sftrainer's own VLM tests cover the path"
)

NOT_COUNTED: dict[str, str] = {
    "TestSFTTrainerSlow::*": "needs a CUDA accelerator and the stanfordnlp/imdb data set",
    "TestSFTTrainer::test_train_vlm*": VISION,
    "TestSFTTrainer::test_vision_dataset_with_text_model_raises": VISION,
    "TestSFTTrainer::test_pad_token_id_synced_with_model_config_vision": VISION,
    "TestSFTTrainer::test_train_padding_free": "flash-attention kernels on an Ampere GPU",
    "TestSFTTrainer::test_train_with_liger": "liger-kernel (a kernel library, not installed)",
}

_CU_SEQ_LENS = (
    "TRL 1.16.0 fails it: its padding-free collator also returns cu_seq_lens_q/k, max_length_q/k and seq_idx"
)
NEWER_THAN_TRL: dict[str, str] = {
    "TestDataCollatorForLanguageModeling::test_padding_free_mode": _CU_SEQ_LENS,
    "TestDataCollatorForLanguageModeling::test_padding_free_without_labels": _CU_SEQ_LENS,
    "TestDataCollatorForLanguageModeling::test_packing": _CU_SEQ_LENS,
    "TestDataCollatorForLanguageModeling::test_pad_to_multiple_of_and_padding_free": _CU_SEQ_LENS,
    "TestSFTTrainer::test_padding_free_warns_only_for_unsupported_attention[eager-True]": (
        "TRL 1.16.0 fails it: it emits no 'supported Flash Attention variant' warning"
    ),
    "TestSFTTrainer::test_train_with_compute_loss_func": (
        "TRL 1.16.0 fails it: its compute_loss_func FutureWarning has other words"
    ),
}

_README = "README, Switching from TRL, 'Different, on purpose': "
_PACKED_APART = _README + "DataCollatorForLanguageModeling on packed rows: kept apart, no attention_mask"
_NO_LOGITS_DEPRECATION = _README + "compute_metrics / predict() logits: supported, no FutureWarning"
_TAGS = _README + "model-card tags: sft, sftrainer (not trl)"
DOCUMENTED: dict[str, str] = {
    "TestDataCollatorForLanguageModeling::test_return_position_ids_packed": _PACKED_APART,
    "TestDataCollatorForLanguageModeling::test_custom_position_ids_but_no_padding_free": _PACKED_APART,
    "TestSFTTrainer::test_train_model_dtype": _README + "a bf16 / fp16 checkpoint: float32 master weights",
    "TestSFTTrainer::test_padding_free_without_packing_and_max_length_raises": (
        _README + "padding_free without packing: max_length is enforced (rows truncated), not refused"
    ),
    "TestSFTTrainer::test_init_with_train_dataset[unsupported_dataset_dict]": (
        _README + "train_dataset: a DatasetDict gives the train (and eval) split"
    ),
    "TestSFTTrainer::test_train_with_compute_metrics": _NO_LOGITS_DEPRECATION,
    "TestSFTTrainer::test_predict_returns_logits": _NO_LOGITS_DEPRECATION,
    "TestSFTTrainer::test_tag_added": _TAGS,
    "TestSFTTrainer::test_tag_added_peft": _TAGS,
    "TestSFTTrainer::test_train_peft_and_quantization": _README + "QLoRA adapters: float32, not bf16",
}


def reason(table: dict[str, str], test: str) -> str | None:
    """The reason ``table`` gives for ``test``: by its exact name (whose ``[params]`` fnmatch would read
    as a character class), else by the first pattern that matches."""
    if test in table:
        return table[test]
    return next((why for pattern, why in table.items() if fnmatchcase(test, pattern)), None)
