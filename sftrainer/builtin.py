"""The built-in demo: a tiny Llama-architecture model and a data set of small deterministic tasks.

Both are built locally (no network), saved with ``save_pretrained`` / as JSONL in a cache directory
(``$SFTRAINER_HOME``, default ``~/.cache/sftrainer``), and loaded back through the same code paths
as any real model and data set. A missing or corrupt cache entry is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftrainer.vision import builtin as builtin_vlm

logger = logging.getLogger(__name__)

VERSION = "v1"
BUILTIN = "builtin"
BUILTIN_VLM = "builtin-vlm"  # a tiny LLaVA for the vision-language example (sftrainer.vision.builtin)

WORDS = (
    "apple", "berry", "cat", "dog", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp",
    "moon", "nut", "owl", "pig", "quiz", "rat", "sun", "tree", "van", "wolf", "yak", "zebra",
)  # fmt: skip

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# The demo run (`sftrainer train` with no config file). Every key can be overridden: key=value.
DEMO_CONFIG: dict[str, Any] = {
    "model": {"name_or_path": BUILTIN},
    "data": {"train": BUILTIN, "eval": BUILTIN},
    "output_dir": "outputs/demo",
    "max_length": 64,
    "num_train_epochs": 3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.0,
    "logging_steps": 25,
    "eval_strategy": "no",
    "save_strategy": "no",
    "exact_match_samples": 200,
    "exact_match_max_new_tokens": 16,
    "seed": 0,
    "report_to": "none",
}


def cache_dir() -> Path:
    return Path(os.environ.get("SFTRAINER_HOME") or Path.home() / ".cache" / "sftrainer")


# ---- data ---------------------------------------------------------------------------------


def _task(rng: random.Random) -> dict[str, str]:
    kind = rng.randrange(4)
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
    if kind == 0:
        return {"prompt": f"Reverse the words: {' '.join(words)}", "response": " ".join(reversed(words))}
    if kind == 1:
        return {"prompt": f"Sort the words: {' '.join(words)}", "response": " ".join(sorted(words))}
    if kind == 2:
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 9))]
        return {"prompt": f"Count the words: {' '.join(words)}", "response": str(len(words))}
    return {"prompt": f"Last word of: {' '.join(words)}", "response": words[-1]}


def make_tasks(n_train: int = 6000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Deterministic train and held-out eval rows; no eval prompt appears in train."""
    rng = random.Random(seed)
    eval_rows: dict[str, dict] = {}
    while len(eval_rows) < n_eval:
        row = _task(rng)
        eval_rows[row["prompt"]] = row
    train_rows: list[dict] = []
    while len(train_rows) < n_train:
        row = _task(rng)
        if row["prompt"] not in eval_rows:
            train_rows.append(row)
    return train_rows, list(eval_rows.values())


def data_files() -> tuple[Path, Path]:
    """(train.jsonl, eval.jsonl) of the built-in tasks, generated on first use."""
    root = cache_dir() / f"builtin-data-{VERSION}"
    train_path, eval_path = root / "train.jsonl", root / "eval.jsonl"
    if not (train_path.is_file() and eval_path.is_file() and _jsonl_ok(train_path) and _jsonl_ok(eval_path)):
        train_rows, eval_rows = make_tasks()
        with _atomic_dir(root) as tmp:
            _write_jsonl(tmp / "train.jsonl", train_rows)
            _write_jsonl(tmp / "eval.jsonl", eval_rows)
        logger.info(
            "Built the demo data set: %d train and %d held-out rows in %s",
            len(train_rows),
            len(eval_rows),
            root,
        )
    return train_path, eval_path


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _jsonl_ok(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as fh:
            return all(json.loads(line) for line in fh) and path.stat().st_size > 0
    except (OSError, ValueError):
        return False


# ---- model --------------------------------------------------------------------------------


def _corpus(rows: list[dict]) -> Iterator[str]:
    for row in rows:
        yield row["prompt"]
        yield row["response"]
    yield "0 1 2 3 4 5 6 7 8 9 system user assistant"


def build_tokenizer(rows: list[dict], vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on ``rows``, with BOS, pad and ChatML turn tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(rows), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(
    tokenizer: Any,
    hidden: int = 256,
    layers: int = 4,
    seed: int = 0,
    *,
    intermediate: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    max_positions: int = 512,
) -> Any:
    """A randomly initialised Llama-architecture model sized for CPU training in minutes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 8 // 3 // 16 * 16,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden // 64,
        num_key_value_heads=kv_heads or hidden // 128,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def is_builtin(name: str | None) -> bool:
    """'builtin' or 'builtin-vlm': a model built here from random weights (trained from scratch)."""
    return name in (BUILTIN, BUILTIN_VLM)


def model_path(name: str) -> str:
    """The directory of a built-in model's name (built on first use); any other name as it is."""
    if name == BUILTIN:
        return str(model_dir())
    if name == BUILTIN_VLM:
        return str(vlm_model_dir())
    return name


def model_dir() -> Path:
    """Directory of the built-in model, built on first use or when the cached copy is broken."""
    root = cache_dir() / f"builtin-llama-{VERSION}"
    if not _model_ok(root):
        train_path, _ = data_files()
        with open(train_path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh]
        with _atomic_dir(root) as tmp:
            tokenizer = build_tokenizer(rows)
            build_model(tokenizer).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        logger.info("Built the demo model in %s", root)
    return root


def vlm_model_dir() -> Path:
    """Directory of the built-in vision-language model, built on first use or when broken."""
    root = cache_dir() / builtin_vlm.DIRECTORY
    if not (all((root / name).is_file() for name in builtin_vlm.FILES) and _model_ok(root)):
        with _atomic_dir(root) as tmp:
            builtin_vlm.save(tmp)
        logger.info("Built the demo vision-language model in %s", root)
    return root


def _model_ok(root: Path) -> bool:
    try:
        from safetensors import safe_open

        json.loads((root / "config.json").read_text())
        json.loads((root / "tokenizer.json").read_text())
        with safe_open(str(root / "model.safetensors"), framework="pt") as fh:
            return len(list(fh.keys())) > 0
    except Exception:  # missing, truncated or unreadable: rebuild
        return False


class _atomic_dir:
    """Build into a temporary sibling directory, then swap it into place."""

    def __init__(self, target: Path):
        self.target = target

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)
