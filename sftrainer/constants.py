"""Constants shared across modules (one home, so no module imports another for a number)."""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)
TRAIN_ON = ("response", "all", "last_turn")  # which tokens carry loss; see SFTConfig.train_on
PAIR_TEMPLATES = ("auto", "chat", "raw")  # how prompt/response pairs are rendered
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")  # see SFTConfig.packing_strategy
TRUNCATION_MODES = ("keep_start", "keep_end")  # which end of an overlong row is kept
LOSS_TYPES = ("nll", "dft")  # see SFTConfig.loss_type
LOSS_MASK_COLUMNS = ("completion_mask", "assistant_masks")  # TRL's 0/1 loss masks of pre-tokenized rows
BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit data types; see model.bnb_4bit_quant_type
BNB_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # see model.bnb_4bit_compute_dtype
