"""Which of TRL's tests the harness counts, and which failures are documented, deliberate differences.

Test names are ``Class::test[params]`` patterns (``fnmatch``).

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

DOCUMENTED: dict[str, str] = {}
