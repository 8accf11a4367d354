"""Sharded training (FSDP2, DeepSpeed ZeRO): the settings, checked before any work, and what it takes
for the machine to run them.

transformers and accelerate run both engines from the ``TrainingArguments`` keys ``fsdp`` /
``fsdp_config`` and ``deepspeed``; sftrainer adds the checks they leave out or make late, with a
traceback, or not at all:

- ``settings_problems(args)`` (in ``SFTConfig.problems``): ``fsdp_config`` without ``fsdp``, an
  unknown ``fsdp_config`` key (transformers ignores it silently), FSDP's activation checkpointing
  together with ``activation_checkpointing``, FSDP and DeepSpeed together, a DeepSpeed config that
  cannot be read, and ZeRO-3 without ``stage3_gather_16bit_weights_on_model_save`` (its final model
  would be DeepSpeed shards, which ``from_pretrained`` cannot load); DeepSpeed not installed
  (``TrainingArguments`` fails on it with a bare ``PackageNotFoundError``).
- ``machine_problems(args, accelerator, launched)``: FSDP or DeepSpeed on a machine without GPUs, or
  with ``use_cpu``. accelerate 1.16 enables FSDP only for multi-accelerator jobs
  (``AcceleratorState``): a CPU job runs as plain DDP with the FSDP settings dropped, without a word.
  FSDP in one process without a launcher (transformers: "Using fsdp only works in distributed training").
- ``quantized_problems``: a 4-bit base under FSDP / ZeRO-3 must be stored in the model's float dtype.
- ``is_partitioned(model)``: ZeRO-3 partitioned it while loading; its dtypes are DeepSpeed's to keep.
- ``gathers_nothing_on_save(trainer)``: transformers 5.25 ``Trainer.save_model`` writes no weights
  at all for an FSDP run with ``state_dict_type: SHARDED_STATE_DICT``; ``SFTTrainer.save_model``
  gathers the full weights for the final model instead (checkpoints stay sharded).
- ``parameter_sharding(trainer)``: the engine that shards a trainer's parameters, if one does
  (``SFTTrainer`` then computes the loss unchunked: the chunked loss reads the LM head's whole weight).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sftrainer.errors import ConfigError, did_you_mean

# The fsdp_config keys transformers 5.25 reads (TrainingArguments._process_fsdp_args); each may also
# be spelled with an `fsdp_` prefix, as accelerate config files do.
FSDP_CONFIG_KEYS = (
    "version",
    "reshard_after_forward",
    "auto_wrap_policy",
    "transformer_layer_cls_to_wrap",
    "min_num_params",
    "cpu_offload",
    "state_dict_type",
    "cpu_ram_efficient_loading",
    "activation_checkpointing",
    "forward_prefetch",  # FSDP1 only, from here on
    "backward_prefetch",
    "use_orig_params",
    "sync_module_states",
    "limit_all_gathers",
    "xla",
    "xla_fsdp_v2",
    "xla_fsdp_grad_ckpt",
    "xla_fsdp_settings",
)
FSDP_STATE_DICT_TYPES = ("FULL_STATE_DICT", "SHARDED_STATE_DICT")  # FSDP2 has no LOCAL_STATE_DICT
ZERO3_GATHER_KEYS = ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save")
INSTALL_DEEPSPEED = (
    "pip install deepspeed (on a machine with GPUs: it compiles its CUDA ops with the CUDA toolkit)"
)


def deepspeed_available() -> bool:
    """Whether DeepSpeed is installed; found without importing it (importing it probes CUDA)."""
    return importlib.util.find_spec("deepspeed") is not None


def engine(args: Any) -> str | None:
    """'fsdp', 'deepspeed' or None: which sharding engine ``args`` asks for."""
    if getattr(args, "fsdp", None):
        return "fsdp"
    if getattr(args, "deepspeed", None):
        return "deepspeed"
    return None


# ---- settings ------------------------------------------------------------------------------


def settings_problems(args: Any) -> list[str]:
    """Problems of the ``fsdp`` / ``fsdp_config`` / ``deepspeed`` keys of ``args``, as 'key: problem'."""
    out: list[str] = []
    fsdp, fsdp_config, deepspeed = args.fsdp, args.fsdp_config, args.deepspeed
    if fsdp and deepspeed:
        out.append("fsdp / deepspeed: choose one sharding engine; both are set")
    if fsdp_config is not None and not fsdp:
        out.append("fsdp_config: is read only with fsdp: true; add fsdp: true, or remove fsdp_config")
    if fsdp_config is not None:
        values, problem = _read_json(fsdp_config, "fsdp_config")
        out += [problem] if problem else fsdp_config_problems(values)
        checkpointing = getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
        if values and _flag(_get(values, "activation_checkpointing")) and checkpointing:
            out.append(
                "fsdp_config.activation_checkpointing: set it or activation_checkpointing "
                "(gradient_checkpointing), not both; under FSDP prefer fsdp_config's: the other "
                "all-gathers the weights once more in the backward pass"
            )
    if deepspeed:
        if not deepspeed_available():
            out.append(f"deepspeed: DeepSpeed is not installed: {INSTALL_DEEPSPEED}")
        values, problem = _read_json(deepspeed, "deepspeed")
        out += [problem] if problem else deepspeed_config_problems(values)
    return out


def fsdp_config_problems(values: Mapping[str, Any], key: str = "fsdp_config") -> list[str]:
    """Unknown keys and values of an FSDP config mapping (keys with or without the ``fsdp_`` prefix)."""
    out = []
    for name in values:
        bare = name.removeprefix("fsdp_")
        if bare not in FSDP_CONFIG_KEYS:
            out.append(
                f"{key}.{name}: not an FSDP setting transformers reads{did_you_mean(bare, FSDP_CONFIG_KEYS)}"
            )
    version = _get(values, "version", 2)
    if str(version) not in ("1", "2"):
        out.append(f"{key}.version: must be 2 (FSDP2) or 1 (FSDP1, deprecated), got {version!r}")
    kind = _get(values, "state_dict_type")
    if kind is not None and str(kind).upper() not in FSDP_STATE_DICT_TYPES:
        out.append(
            f"{key}.state_dict_type: must be one of {FSDP_STATE_DICT_TYPES}, got {kind!r}"
            f"{did_you_mean(str(kind).upper(), FSDP_STATE_DICT_TYPES)}"
        )
    return out


def deepspeed_config_problems(values: Mapping[str, Any], key: str = "deepspeed") -> list[str]:
    """Problems of a DeepSpeed config mapping that need no DeepSpeed to find."""
    zero = values.get("zero_optimization", {})
    if not isinstance(zero, Mapping):
        return [f"{key}.zero_optimization: must be a mapping (stage: 2, ...), got {zero!r}"]
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        return [f"{key}.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}"]
    if stage == 3 and not any(_flag(zero.get(k)) for k in ZERO3_GATHER_KEYS):
        return [
            f"{key}.zero_optimization.stage3_gather_16bit_weights_on_model_save: must be true under "
            "ZeRO-3, or the final model is saved as DeepSpeed's partitioned checkpoint, which "
            "from_pretrained cannot load (zero_to_fp32.py converts it afterwards)"
        ]
    return []


def read_deepspeed_config(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config ``value`` names (a JSON file or a mapping). Raises ``ConfigError``."""
    values, problem = _read_json(value, "deepspeed")
    if problem:
        raise ConfigError(problem)
    return values


def zero_stage(args: Any) -> int | None:
    """The ZeRO stage ``args.deepspeed`` asks for, or None without DeepSpeed."""
    if not args.deepspeed:
        return None
    zero = read_deepspeed_config(args.deepspeed).get("zero_optimization", {})
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else None


def quantized_problems(args: Any, model_dtype: str, quant_storage: str | None, four_bit: bool) -> list[str]:
    """A 4-bit base under FSDP or ZeRO-3: bitsandbytes' packed weights can be sharded only when they
    are stored in a float dtype (``bnb_4bit_quant_storage``), and only together with the other weights
    of a layer when that is the model's dtype (bitsandbytes docs, "FSDP-QLoRA")."""
    sharded = engine(args) == "fsdp" or (engine(args) == "deepspeed" and zero_stage(args) == 3)
    if not (sharded and four_bit):
        return []
    name = "FSDP" if engine(args) == "fsdp" else "DeepSpeed ZeRO-3"
    storage = (quant_storage or "uint8").removeprefix("torch.")
    if storage == "uint8" or storage != model_dtype:
        return [
            f"model.quantization_config.bnb_4bit_quant_storage: {name} shards a 4-bit base only when its "
            f"packed weights are stored in the model's dtype; got {storage} with model.dtype: {model_dtype}. "
            "Set model.dtype: bfloat16 and, in model.quantization_config, bnb_4bit_quant_storage: bfloat16 "
            "(with load_in_4bit: true there instead of model.load_in_4bit)"
        ]
    return []


# ---- the machine ---------------------------------------------------------------------------


def machine_problems(args: Any, accelerator: str | None, launched: bool) -> list[str]:
    """What stops ``args``' sharding engine on this machine. ``accelerator``: the accelerator type
    (``precision.accelerator_type()``: "cuda", ... or None); ``launched``: the run is (or is about to
    be) started by torchrun / accelerate launch."""
    name = engine(args)
    if name is None:
        return []
    what = "FSDP" if name == "fsdp" else "DeepSpeed"
    keys = "fsdp and fsdp_config" if name == "fsdp" else "deepspeed"
    if args.use_cpu or accelerator is None:
        why = (
            "use_cpu: true is set"
            if accelerator is not None
            else "this machine has no GPU (torch sees no CUDA, XPU or other accelerator)"
        )
        dropped = (
            "; accelerate would run it as plain DDP and drop the FSDP settings" if name == "fsdp" else ""
        )
        return [
            f"{name}: {what} shards the training across GPUs, and {why}{dropped}. To train on the CPU, "
            f"remove {keys} (for several CPU processes: --nproc N with use_cpu=true); for {what}, run on "
            "a machine with GPUs"
        ]
    if name == "fsdp" and not launched:
        return [
            "fsdp: FSDP shards the model across several processes, and this one was started alone; run "
            "`sftrainer train CONFIG --nproc N`, torchrun or accelerate launch (one process per GPU)"
        ]
    return []


def check_machine(args: Any, launched: bool | None = None) -> None:
    """Raise ``ConfigError`` listing ``machine_problems`` for this machine. ``launched``: default,
    whether this process runs under a launcher (``args.parallel_mode``; this sets up the devices)."""
    from sftrainer.precision import accelerator_type

    if engine(args) is None:
        return
    if launched is None:
        from transformers.training_args import ParallelMode

        launched = args.parallel_mode == ParallelMode.DISTRIBUTED
    problems = machine_problems(args, accelerator_type(), launched)
    if problems:
        raise ConfigError("\n".join(problems))


def is_partitioned(model: Any) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``model``'s parameters as it loaded (``zero.Init``): each
    then holds an empty placeholder and its partition in ``ds_tensor``. transformers 5.25 does this
    under ZeRO-3 for models loaded after the config, except quantized ones (``from_pretrained``)."""
    return any(hasattr(param, "ds_tensor") for param in model.parameters())


# ---- saving --------------------------------------------------------------------------------


def gathers_nothing_on_save(trainer: Any) -> bool:
    """An FSDP run whose ``Trainer.save_model`` writes no weights (``SHARDED_STATE_DICT``)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    return "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type)


def parameter_sharding(trainer: Any) -> str | None:
    """The engine that shards parameters across processes (FSDP, DeepSpeed ZeRO-3, tensor
    parallelism), if one is used."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "FSDP"
    if trainer.get_tp_size() > 1:
        return "tensor parallelism"
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return None


# ---- helpers -------------------------------------------------------------------------------


def _read_json(value: Any, key: str) -> tuple[dict[str, Any], str | None]:
    """(mapping, None) for a mapping or a JSON file, or ({}, the problem)."""
    if isinstance(value, Mapping):
        return dict(value), None
    if not isinstance(value, str):
        return {}, f"{key}: expected a mapping or the path of a JSON file, got {value!r}"
    path = Path(value)
    if not path.is_file():
        return {}, f"{key}: no such file: {value} (give a JSON file, or the settings as a mapping)"
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return {}, f"{key}: {value} is not valid JSON: {err}"
    if not isinstance(loaded, dict):
        return {}, f"{key}: {value} must hold a JSON object, got {type(loaded).__name__}"
    return loaded, None


def _get(values: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """An FSDP config value, by its bare name or with the ``fsdp_`` prefix."""
    return values.get(name, values.get(f"fsdp_{name}", default))


def _flag(value: Any) -> bool:
    return value is True or str(value).lower() == "true"
