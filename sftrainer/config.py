"""``SFTConfig``: ``TrainingArguments`` plus the settings of supervised fine-tuning, validated in one
place (``problems()``: every bad value at once, each by its key). A YAML run (``run_config``) adds
the ``model``, ``data`` and ``lora`` sections around it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainingArguments

import sftrainer.precision as precision
import sftrainer.sharding as sharding
from sftrainer.coerce import init_fields
from sftrainer.compat import normalise_trl_values, sft_values_from, trl_field_problems
from sftrainer.data.pack import packing_strategy_problems
from sftrainer.data.prepare import DataSettings
from sftrainer.errors import ConfigError, warn_caller
from sftrainer.evaluate import load_scorer
from sftrainer.memory import offloading_problems, optimizer_problems
from sftrainer.model import chat_template_problems

logger = logging.getLogger(__name__)

# The three step intervals of transformers: (strategy key, steps key, what is done every steps).
INTERVALS = (
    ("save_strategy", "save_steps", "save"),
    ("eval_strategy", "eval_steps", "evaluate"),
    ("logging_strategy", "logging_steps", "log"),
)
OVERWRITE_AND_RESUME = (
    "overwrite_output_dir: true removes the checkpoints that resume_from_checkpoint continues from; "
    "set one of them"
)


@dataclass
class SFTConfig(TrainingArguments):
    """``TrainingArguments`` plus the settings of supervised fine-tuning.

    Drop-in for TRL's ``SFTConfig``: ``max_length``, ``dataset_text_field``, ``packing``,
    ``completion_only_loss``, ``assistant_only_loss``, ``dataset_num_proc`` and ``model_init_kwargs``
    mean what they mean there, and the fields TRL 1.16 also has keep its names, defaults and meaning
    (``sftrainer/compat.py``). Fields are grouped by topic; ``problems()`` validates them all.
    """

    if TYPE_CHECKING:  # attributes set by __new__ and resolve_intervals, not fields (declared for mypy only)
        _given: tuple[str, ...] = field(init=False)
        _implied: tuple[str, ...] = field(init=False)

    # ---- Sequence length, truncation, packing and padding --------------------------------------------
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Longest tokenized row; longer rows are truncated and counted. None: no limit."},
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Deprecated TRL name of max_length."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end of a row longer than max_length is kept: 'keep_start' or 'keep_end'."},
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack rows into sequences of up to max_length tokens (best-fit decreasing); rows never "
            "attend to each other and keep their own positions."
        },
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "'bfd': rows longer than max_length are truncated (counted); 'bfd_split': they are "
            "split into max_length pieces instead; 'wrapped': rows are concatenated and cut every max_length "
            "tokens (continued pre-training), each piece still isolated from its neighbours."
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Without packing: concatenate each batch into one row (no padding tokens at all)."},
    )
    eval_packing: bool | None = field(
        default=None, metadata={"help": "Pack the eval data too; default: the same as packing."}
    )
    pad_to_multiple_of: int | str | None = field(
        default=None,
        metadata={"help": "Pad batches to a multiple of this ('auto', TRL's default: None here)."},
    )

    # ---- Data: which column, how rows are rendered, which tokens carry loss --------------------------
    dataset_text_field: str | None = field(
        default=None,
        metadata={
            "help": "Column holding plain text. 'prompt' on prompt/response rows trains on the response."
        },
    )
    train_on: str = field(
        default="response",
        metadata={
            "help": "Which tokens carry loss: 'response' (responses / assistant turns + end of turn), "
            "'last_turn' (the last assistant turn only) or 'all'."
        },
    )
    completion_only_loss: bool | None = field(
        default=None, metadata={"help": "TRL name: False trains on all tokens (same as train_on='all')."}
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "TRL name: True trains on assistant turns only (already the default)."},
    )
    pair_template: str = field(
        default="auto",
        metadata={
            "help": "How prompt/response pairs are rendered: 'chat' (the chat template), 'raw' "
            "(prompt + response + EOS) or 'auto' (raw for prompt/completion, chat otherwise)."
        },
    )
    split_turns: bool = field(
        default=False,
        metadata={
            "help": "Train each assistant turn of a conversation as its own example, its history rendered "
            "as at inference (for templates that rewrite history, e.g. drop past reasoning)."
        },
    )
    train_empty_reasoning: bool = field(
        default=False,
        metadata={
            "help": "Train the empty reasoning block a chat template writes before an answer that carries no "
            "reasoning (Qwen3: <think></think>). Off: it is context, as at inference in non-thinking mode, "
            "and the model does not learn to skip thinking."
        },
    )

    # ---- Tokenizer: chat template and special tokens -------------------------------------------------
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "A Jinja chat template, or a path to one (.jinja/.j2/.txt/.json), replacing the tokenizer's."
        },
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "TRL name: a .jinja file, or a tokenizer directory / hub id whose template (and EOS) to use."
        },
    )
    chat_template_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "Extra variables for the chat template, e.g. {enable_thinking: false}; a row's own "
            "chat_template_kwargs column wins."
        },
    )
    eos_token: str | None = field(
        default=None,
        metadata={
            "help": "End-of-sequence token to train, replacing the tokenizer's (must be in its vocabulary)."
        },
    )
    pad_token: str | None = field(
        default=None,
        metadata={
            "help": "Padding token, replacing the tokenizer's (must be in its vocabulary); default: its own, else EOS."
        },
    )

    # ---- Data preparation: processes, bad rows, the cache, order -------------------------------------
    dataset_num_proc: int | None = field(
        default=None,
        metadata={
            "help": "Processes used to tokenize the data. Unset: one per 10,000 rows, at most one per CPU core "
            "(TRL: one process)."
        },
    )
    skip_invalid_rows: bool = field(
        default=False, metadata={"help": "Drop (and count) rows that cannot be used instead of failing."}
    )
    overwrite_cache: bool = field(
        default=False,
        metadata={
            "help": "Prepare the data again even if a prepared copy is cached (the cache is keyed by the data, "
            "tokenizer, template, settings and sftrainer version, so this is rarely needed)."
        },
    )
    dataset_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "TRL: {'skip_prepare_dataset': True} uses the data as given (tokenized rows)."},
    )
    shuffle_dataset: bool = field(
        default=False, metadata={"help": "Shuffle the prepared rows (before and after packing), with seed."}
    )

    # ---- Loss ----------------------------------------------------------------------------------------
    loss_type: str = field(
        default="nll",
        metadata={
            "help": "'nll' (cross-entropy) or 'dft' (token losses weighted by the detached p(target))."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Positions per chunk of the loss, which never holds full-vocabulary logits; "
            "None: about 16M logits per chunk (vocabulary-dependent)."
        },
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "MoE load-balancing loss weight; None: the model config's; 0: off."},
    )

    # ---- Model loading -------------------------------------------------------------------------------
    model_init_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the model is given as a path."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint when model is a path (unsafe)."}
    )

    # ---- Vision-language models ----------------------------------------------------------------------
    image_root: str | None = field(
        default=None,
        metadata={
            "help": "Directory relative image paths in the data are read from (default: the current one)."
        },
    )
    train_projector: bool = field(
        default=False,
        metadata={
            "help": "Vision-language models: also train the projector between vision tower and language model "
            "(in full; with LoRA it is saved with the adapter)."
        },
    )
    train_vision_tower: bool = field(
        default=False,
        metadata={
            "help": "Vision-language models: also train the vision tower (in full, or with LoRA on its layers)."
        },
    )

    # ---- Memory and sharding -------------------------------------------------------------------------
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Keep the activations saved for backward in CPU memory (CUDA GPU only; parameters stay put)."
        },
    )
    # TrainingArguments types this `str | None` (its legacy strings); `fsdp: true` is the 5.x spelling.
    fsdp: bool | str | None = field(  # type: ignore[assignment]  # widens TrainingArguments' type
        default=None,
        metadata={
            "help": "FSDP (FSDP2 by default): shard weights, gradients and optimizer state across GPUs; "
            "settings in fsdp_config. Needs GPUs and a launcher (--nproc N)."
        },
    )

    # ---- Evaluation by generation --------------------------------------------------------------------
    exact_match_samples: int = field(
        default=0,
        metadata={
            "help": "Score this many eval rows by greedy generation (eval_exact_match, eval_normalized_match "
            "with the reference response) at each evaluation; 0 turns it off."
        },
    )
    exact_match_max_new_tokens: int = field(
        default=64, metadata={"help": "Generation limit (new tokens) of the generation-based evaluation."}
    )
    generation_prompts: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Generate from these prompts at each evaluation instead of eval rows: a list of strings "
            "or a data file (prompt + optional reference column, or any training format)."
        },
    )
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts generated at once in the generation-based evaluation."}
    )
    generation_temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature of the generation-based evaluation; 0: greedy."}
    )
    generation_scorer: str | None = field(
        default=None,
        metadata={
            "help": "'module:function' or 'file.py:function' called as f(prediction, reference, prompt) -> "
            "float or dict of floats, averaged into eval_<name>."
        },
    )

    # ---- Output directory and resuming ---------------------------------------------------------------
    # TrainingArguments types this `str | None`, which refused YAML's `true` (Trainer.train's idiom).
    resume_from_checkpoint: str | bool | None = field(  # type: ignore[assignment]  # widens TrainingArguments' type
        default=None,
        metadata={
            "help": "A checkpoint directory to resume from, or true: the latest checkpoint in output_dir."
        },
    )
    # transformers 5 removed this TrainingArguments field (its example scripts read it); here it is
    # what lets a run start over in a used output_dir (sftrainer.run_dir).
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start over in an output_dir that holds an earlier run: its checkpoints, metrics.jsonl and "
            "eval samples are removed when training (or evaluating) starts. Default: such a run is refused."
        },
    )
    allow_batch_change_on_resume: bool = field(
        default=False,
        metadata={
            "help": "Resume a checkpoint written at another effective batch size (processes x "
            "per_device_train_batch_size x gradient_accumulation_steps); refused by default: the examples "
            "of each step and the steps per epoch change."
        },
    )

    # ---- TrainingArguments defaults suited to fine-tuning rather than pre-training -------------------
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate (AdamW)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the loss every N optimizer steps."})
    bf16: bool | None = field(  # type: ignore[assignment]  # widens TrainingArguments' type: None = by accelerator
        default=None,
        metadata={
            "help": "bf16 mixed precision; default: on when the accelerator (CUDA, MPS, XPU) supports it."
        },
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> SFTConfig:
        # Which fields the caller named: a *_steps the caller set turns its strategy to "steps"
        # only where the caller left the strategy unset (resolve_intervals). Copies keep it.
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        self._given = (*names[: len(args)], *kwargs)
        return self

    def __post_init__(self) -> None:
        resolve_intervals(self)
        problems = self.problems()
        if problems:
            raise ConfigError("Invalid SFTConfig:\n" + "\n".join(f"  {p}" for p in problems))
        normalise_trl_values(self)
        if self.max_seq_length is not None:
            warn_caller("max_seq_length is deprecated; use max_length.", FutureWarning)
            self.max_length, self.max_seq_length = self.max_seq_length, None
        if self.completion_only_loss is False:
            self.train_on = "all"
        precision.apply_mixed_precision(self)
        if self.dataloader_pin_memory and not precision.has_accelerator():
            # Pinning needs a device to copy to; without one torch warns on every DataLoader.
            self.dataloader_pin_memory = False
        try:
            super().__post_init__()
        except ValueError as err:
            raise ConfigError(f"Invalid SFTConfig: {err}") from None

    def problems(self) -> list[str]:
        """Every invalid SFT setting, as 'key: problem'."""
        out = self.data_settings().problems() + packing_strategy_problems(self.packing_strategy)
        out += trl_field_problems(self)
        out += optimizer_problems(self.optim) + offloading_problems(self.activation_offloading, self.use_cpu)
        out += sharding.settings_problems(self)
        for key in ("max_length", "max_seq_length", "pad_to_multiple_of", "loss_chunk_size"):
            value = getattr(self, key)
            if key == "pad_to_multiple_of" and value == "auto":
                continue
            if value is not None and (not isinstance(value, int) or value < 1):
                out.append(f"{key}: must be a positive integer or null, got {value!r}")
        if self.overwrite_output_dir and self.resume_from_checkpoint not in (None, False):
            out.append(OVERWRITE_AND_RESUME)
        if self.completion_only_loss is True and self.train_on == "all":
            out.append("completion_only_loss=True contradicts train_on='all'")
        if self.assistant_only_loss and self.train_on == "all":
            out.append("assistant_only_loss=True contradicts train_on='all'")
        if (self.packing or self.eval_packing) and self.max_length is None and self.max_seq_length is None:
            out.append("packing: needs max_length (the length of a packed sequence)")
        if self.exact_match_samples < 0:
            out.append(f"exact_match_samples: must be >= 0, got {self.exact_match_samples}")
        out += self._generation_problems()
        out += chat_template_problems(self.chat_template, self.chat_template_path)
        for key in ("eos_token", "pad_token"):
            if getattr(self, key) == "":
                out.append(f"{key}: must be a token of the tokenizer or null, got ''")
        if self.image_root is not None and not Path(self.image_root).expanduser().is_dir():
            out.append(f"image_root: no such directory: {self.image_root}")
        return out

    def _generation_problems(self) -> list[str]:
        out = []
        for key in ("exact_match_max_new_tokens", "generation_batch_size"):
            if getattr(self, key) < 1:
                out.append(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.generation_temperature < 0:
            out.append(f"generation_temperature: must be >= 0 (0: greedy), got {self.generation_temperature}")
        prompts = self.generation_prompts
        if prompts is not None and self.exact_match_samples:
            out.append(
                "generation_prompts: set generation_prompts or exact_match_samples (eval rows), not both"
            )
        if isinstance(prompts, str) and not Path(prompts).exists():
            out.append(f"generation_prompts: no such file: {prompts} (a list of prompts is a YAML list)")
        if isinstance(prompts, list) and not prompts:
            out.append("generation_prompts: the list is empty")
        if self.generation_scorer is not None:
            try:
                load_scorer(self.generation_scorer)
            except ConfigError as err:
                out.append(str(err))
        return out

    def generation_enabled(self) -> bool:
        return bool(self.exact_match_samples) or self.generation_prompts is not None

    def data_settings(self, columns: Mapping[str, str] | None = None) -> DataSettings:
        return DataSettings(
            max_length=self.max_length,
            train_on=self.train_on,
            pair_template=self.pair_template,
            text_field=self.dataset_text_field,
            columns=dict(columns or {}),
            num_proc=self.dataset_num_proc,
            skip_invalid_rows=self.skip_invalid_rows,
            chat_template_kwargs=dict(self.chat_template_kwargs or {}),
            split_turns=self.split_turns,
            train_empty_reasoning=self.train_empty_reasoning,
            truncation_mode=self.truncation_mode,
            overwrite_cache=self.overwrite_cache,
        )


def resolve_intervals(cfg: SFTConfig) -> None:
    """A ``save_steps`` / ``eval_steps`` / ``logging_steps`` the caller set, whose strategy the caller
    left unset, turns that strategy to 'steps' (transformers would ignore it under its default
    ``eval_strategy='no'``); said in the log, and recorded in ``cfg._implied``. A steps value that
    its strategy, also set by the caller, ignores ('no', 'epoch', 'best') is a warning. The caller is
    unknown for a config built without ``__new__`` (all fields then count as set); a steps value
    equal to its default counts as unset for the warning (a resolved config or a converted
    ``TrainingArguments`` carries every default)."""
    given = getattr(cfg, "_given", None)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    cfg._implied = ()
    for strategy_key, steps_key, doing in INTERVALS:
        steps, strategy = getattr(cfg, steps_key), getattr(cfg, strategy_key)
        if isinstance(steps, float) and steps.is_integer():  # YAML and the command line give 10.0
            steps = int(steps)
        unset = strategy is None or (given is not None and strategy_key not in given)
        if strategy is None:  # None: unset (transformers' own type would refuse it)
            strategy = fields[strategy_key].default
            setattr(cfg, strategy_key, strategy)
        strategy = getattr(strategy, "value", strategy)
        if steps is None or strategy == "steps" or (given is not None and steps_key not in given):
            continue
        if unset:
            setattr(cfg, strategy_key, "steps")
            cfg._implied += (strategy_key,)
            logger.info(
                "%s=%s without %s: set to 'steps' (instead of the default '%s'), to %s every %s steps",
                steps_key, steps, strategy_key, strategy, doing, steps,
            )  # fmt: skip
        elif steps != fields[steps_key].default:
            logger.warning(
                "%s=%s has no effect: %s is '%s' (set %s='steps' to %s every %s steps)",
                steps_key, steps, strategy_key, strategy, strategy_key, doing, steps,
            )  # fmt: skip


def to_sft_config(args: TrainingArguments | None, output_dir: str = "sftrainer_output") -> SFTConfig:
    """Accept ``SFTConfig``, a plain ``TrainingArguments`` (older TRL style) or None."""
    if args is None:
        return SFTConfig(output_dir=output_dir)
    if isinstance(args, SFTConfig):
        return args
    if not isinstance(args, TrainingArguments):
        raise ConfigError(f"args must be SFTConfig or TrainingArguments, got {type(args).__name__}")
    # Every field both classes share is copied: a trl.SFTConfig keeps its SFT settings. `args` already
    # ran __post_init__; fp16 there means the user asked for it, bf16 too.
    return SFTConfig(**sft_values_from(args, init_fields(SFTConfig)))
