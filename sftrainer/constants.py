"""Constants shared across modules (one home, so no module imports another for a number)."""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)
TRAIN_ON = ("response", "all", "last_turn")  # which tokens carry loss; see SFTConfig.train_on
PAIR_TEMPLATES = ("auto", "chat", "raw")  # how prompt/response pairs are rendered
PACKING_STRATEGIES = ("bfd", "bfd_split")  # see SFTConfig.packing_strategy
