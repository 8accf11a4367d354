"""Constants shared across modules (one home, so no module imports another for a number)."""

from __future__ import annotations

IGNORE_INDEX = -100  # label of a token that carries no loss (the value torch's cross_entropy skips)
TRAIN_ON = ("response", "all", "last_turn")  # which tokens carry loss; see SFTConfig.train_on
PAIR_TEMPLATES = ("auto", "chat", "raw")  # how prompt/response pairs are rendered
MIXTURE_REPEAT_WARNING = 10  # a weighted mixture source repeated this often is warned about
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")  # see SFTConfig.packing_strategy
TRUNCATION_MODES = ("keep_start", "keep_end")  # which end of an overlong row is kept
# dataset_num_proc unset: one tokenizing process per this many rows, up to one per CPU core (starting
# a process and sending it the tokenizer costs about a second, which fewer rows do not win back).
ROWS_PER_PREPARE_PROCESS = 10_000
# Prompt tails (the text after a prompt's last added token, e.g. an assistant header) up to this long
# have their ids cached per encoder, at most CACHED_TAILS of them (see data/encode.py).
CACHED_TAIL_CHARS = 256
CACHED_TAILS = 4096
BYTES_CHECKED_ROWS = 64  # rows of an encoder's first batch read both from ids and from offsets (token_bytes)
STREAM_PREVIEW_ROWS = 10_000  # `sftrainer data` describes a stream by its first rows
LOSS_TYPES = ("nll", "dft")  # see SFTConfig.loss_type
LOSS_MASK_COLUMNS = ("completion_mask", "assistant_masks")  # TRL's 0/1 loss masks of pre-tokenized rows
# Hub model-card tags of a model sftrainer trains (TRL adds "trl", which would say TRL trained it).
MODEL_TAGS = ("sft", "sftrainer")
# Embeddings grown for tokens a chat template adds are rounded up to a multiple of this (as TRL's
# clone_chat_template): tensor-core friendly shapes.
EMBEDDING_MULTIPLE = 64
# optim names whose optimizer comes from bitsandbytes (the `quant` extra) / torchao (the `torchao` extra)
BITSANDBYTES_OPTIMIZERS = (
    "adamw_bnb_8bit",
    "adamw_8bit",
    "paged_adamw_32bit",
    "paged_adamw_8bit",
    "ademamix",
    "ademamix_8bit",
    "paged_ademamix_32bit",
    "paged_ademamix_8bit",
    "lion_32bit",
    "lion_8bit",
    "paged_lion_32bit",
    "paged_lion_8bit",
    "rmsprop_bnb",
    "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit",
)
TORCHAO_OPTIMIZERS = ("adamw_torch_4bit", "adamw_torch_8bit")
BNB_QUANT_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit data types; see model.bnb_4bit_quant_type
BNB_COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # see model.bnb_4bit_compute_dtype

# Pre-flight learning-rate warnings (sftrainer.preflight): (low, high) outside which a run is flagged.
# Published SFT recipes use about 1e-4 to 3e-4 for LoRA (LoRA, Hu et al. 2021; QLoRA, Dettmers et al.
# 2023: 2e-4 / 1e-4; PEFT and TRL examples) and about 1e-5 to 2e-5 for full fine-tuning (Alpaca,
# Tulu 2, Zephyr: 2e-5). The bounds sit about an order of magnitude outside those.
LORA_LR_RANGE = (1e-5, 1e-3)
FULL_LR_RANGE = (1e-7, 1e-4)
TRUNCATED_WARN_FRACTION = 0.5  # warn when more than this share of the rows is cut to max_length

# Vision-language data (sftrainer.vision): the columns that hold a row's images, the content
# part types that hold one image, and the keys of such a part that can hold the image itself.
IMAGE_COLUMNS = ("images", "image")
# Prepared rows shown rendered with their trained tokens: `sftrainer data` (its --rows default) and
# the masking preview of report.html, the same first rows of each.
FIRST_ROWS = 3
ROW_TOKEN_LIMIT = 400  # tokens of one such row shown before "... (N more tokens)"
IMAGE_PART_TYPES = ("image", "image_url", "input_image")
IMAGE_PART_KEYS = ("image", "image_url", "url", "path", "bytes")
REMOTE_IMAGE_SCHEMES = ("http://", "https://", "ftp://", "s3://", "gs://", "hf://")
# Module names of a vision-language model's parts (sftrainer.vision), across families: LLaVA,
# Gemma 3, PaliGemma (vision_tower, multi_modal_projector, language_model), Idefics3 / SmolVLM
# (vision_model, connector, text_model), Qwen2-VL (visual, its merger).
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")
VISION_TOWER_NAMES = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder")
PROJECTOR_NAMES = ("multi_modal_projector", "connector", "mm_projector", "merger", "vision_projection")

# `sftrainer train --help` (sftrainer.config_help): the transformers.TrainingArguments keys in groups,
# each key in the first group one of whose fnmatch patterns it matches; a key no pattern matches
# (a field a newer transformers adds) is listed under "other".
TRAINING_ARGUMENT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("optimisation", ("learning_rate", "weight_decay", "adam_*", "optim*", "max_grad_norm",
                      "label_smoothing_factor", "gradient_accumulation_steps", "per_device_train_batch_size",
                      "auto_find_batch_size", "average_tokens_across_devices", "neftune_noise_alpha")),
    ("schedule", ("num_train_epochs", "max_steps", "lr_scheduler_*", "warmup_*", "seed", "data_seed",
                  "full_determinism")),
    ("precision, memory and speed", ("bf16*", "fp16*", "tf32", "*checkpointing*", "torch_compile*",
                                     "*liger*", "use_cache", "torch_empty_cache_steps", "skip_memory_metrics")),
    ("logging", ("logging_*", "log_*", "include_num_input_tokens_seen", "disable_tqdm", "report_to",
                 "run_name", "project", "trackio_*")),
    ("evaluation", ("eval_*", "per_device_eval_batch_size", "prediction_loss_only", "include_for_metrics",
                    "batch_eval_metrics", "metric_for_best_model", "greater_is_better",
                    "load_best_model_at_end", "do_eval", "do_predict")),
    ("saving, resuming and the Hub", ("output_dir", "save_*", "enable_jit_checkpoint", "push_to_hub", "hub_*",
                                      "resume_from_checkpoint", "ignore_data_skip",
                                      "restore_callback_states_from_checkpoint")),
    ("distributed", ("ddp_*", "fsdp*", "deepspeed", "accelerator_config", "parallelism_config", "local_rank",
                     "use_cpu")),
    ("data loading", ("dataloader_*", "remove_unused_columns", "label_names", "length_column_name",
                      "train_sampling_strategy")),
)  # fmt: skip
# `sftrainer export --format`: what a run is written as (sftrainer.export), and the GGUF weight types
EXPORT_FORMATS = ("gguf", "gguf-lora", "ollama", "vllm", "sglang")
GGUF_TYPES = ("f16", "bf16", "q8_0")
