"""An estimate of the peak accelerator memory of a training run: weights, gradients, optimizer
state, activations and logits for a model's shape, batch, sequence length and precision (the formula
is ``estimate_memory``'s docstring). Used by the pre-flight (``sftrainer.preflight``); an estimate,
never a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3

# Optimizer state bytes per trainable parameter, by the start of TrainingArguments.optim.
OPTIMIZER_STATE_BYTES = (
    ("adamw_8bit", 2),
    ("paged_adamw_8bit", 2),
    ("adamw_bnb_8bit", 2),
    ("lion_8bit", 1),
    ("paged_lion_8bit", 1),
    ("lion", 4),
    ("paged_lion", 4),
    ("adafactor", 0),  # factored second moments: O(rows + columns), not O(parameters)
    ("sgd", 0),
    ("adagrad", 4),
    ("rmsprop", 4),
    ("adam", 8),  # adamw_torch, adamw_torch_fused, adamw_apex_fused, paged_adamw_32bit...
    ("paged_adam", 8),
)


@dataclass
class ModelShape:
    """What the memory estimate needs of a model (read from a loaded or a meta-device model)."""

    params: int
    trainable: int
    frozen_bytes: int  # frozen parameters in their own dtype
    fp32_params: int  # parameters stored in float32 (autocast keeps a half-precision copy of each)
    half_frozen: bool  # the frozen weights are bf16 / fp16
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # width of K (and of V): kv_heads * head_dim
    heads: int
    vocab: int


def model_shape(model: Any) -> ModelShape:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = trainable = frozen_bytes = fp32 = 0
    half = False
    for p in model.parameters():
        n = p.numel()
        params += n
        if p.requires_grad:
            trainable += n
        else:
            frozen_bytes += n * p.element_size()
            half = half or p.element_size() == 2
        fp32 += n if p.dtype.is_floating_point and p.element_size() == 4 else 0
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return ModelShape(
        params=params,
        trainable=trainable,
        frozen_bytes=frozen_bytes,
        fp32_params=fp32,
        half_frozen=half,
        hidden=hidden,
        layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        kv_dim=kv_heads * head_dim,
        heads=heads,
        vocab=int(getattr(config, "vocab_size", 0) or 0),
    )


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {format_bytes(v)}"
            for name, v in (
                ("weights", self.weights),
                ("gradients", self.gradients),
                ("optimizer", self.optimizer),
                ("activations", self.activations),
                ("logits", self.logits),
            )
        )
        return f"{format_bytes(self.total)} ({parts})"


def optimizer_stateformat_bytes(optim: str) -> int:
    name = str(getattr(optim, "value", optim)).lower()
    for prefix, size in OPTIMIZER_STATE_BYTES:
        if name.startswith(prefix):
            return size
    return 8


def estimate_memory(
    shape: ModelShape,
    batch_size: int,
    seq_len: int,
    *,
    mixed_precision: bool,
    optim: str = "adamw_torch",
    gradient_checkpointing: bool = False,
    eager_attention: bool = False,
    logits_at_once: int | None = None,
) -> MemoryEstimate:
    """Peak training memory of one device, an estimate: the sum of

    - weights: frozen ones in their dtype + 4 bytes per trainable one (fp32 master weights), + 2 bytes
      per fp32 parameter under bf16/fp16 autocast (the half-precision copies autocast keeps while
      a step runs);
    - gradients: 4 bytes per trainable parameter;
    - optimizer state: 8 bytes per trainable parameter for AdamW (two fp32 moments), 2 for 8-bit
      AdamW, 0 for SGD / Adafactor (``OPTIMIZER_STATE_BYTES``);
    - activations: ``b * s * L * (10 h + 3 kv + 4 i) * p`` bytes, the tensors a Llama-style block
      saves for backward per token (norm inputs and outputs, Q, K, V, attention output, gate, up,
      activation, product); ``p`` = 2 under bf16/fp16 (or a half-precision LoRA base), else 4; eager
      attention adds ``2 * b * heads * s^2 * p`` per layer (scores and probabilities); with gradient
      checkpointing ``L`` blocks keep only their input (``b * s * h * p`` each) plus one block's full set;
    - logits: ``n * (p + 8)`` for ``n`` logits alive at once (the head output, its fp32 copy for the
      loss and its gradient): ``n = b * s * V`` for a full-logits loss, at most ``logits_at_once``
      (one chunk) with sftrainer's chunked loss.

    b: per-device batch, s: the longest sequence (max_length when packing), L layers, h hidden,
    kv: width of K and V, i: MLP width, V: vocabulary. Not counted: the CUDA context and allocator
    slack (often 0.5-1 GiB), optimizer temporaries during ``step()``, LoRA dropout copies.
    """
    p = 2 if mixed_precision or shape.half_frozen else 4
    weights = shape.frozen_bytes + 4 * shape.trainable + (2 * shape.fp32_params if mixed_precision else 0)
    per_token_layer = 10 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate
    tokens = batch_size * seq_len
    attention = 2 * batch_size * shape.heads * seq_len * seq_len * p if eager_attention else 0
    full_layer = tokens * per_token_layer * p + attention
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * p + full_layer
    else:
        activations = shape.layers * full_layer
    notes = [f"b={batch_size}, s={seq_len}, activations in {'16' if p == 2 else '32'}-bit"]
    return MemoryEstimate(
        weights=weights,
        gradients=4 * shape.trainable,
        optimizer=optimizer_stateformat_bytes(optim) * shape.trainable,
        activations=activations,
        logits=min(tokens * shape.vocab, logits_at_once or tokens * shape.vocab) * (p + 8),
        notes=notes,
    )


def meta_model(model_path: str, dtype: str, trust_remote_code: bool, peft_config: Any) -> Any:
    """The model's architecture on the meta device (no weights read, no memory), with LoRA applied."""
    import torch
    from transformers import AutoConfig

    from sftrainer import lora
    from sftrainer.model import DTYPES, auto_model_class

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    torch_dtype = DTYPES.get(dtype, "auto")
    if torch_dtype == "auto":
        torch_dtype = getattr(config, "dtype", None) or torch.float32
        torch_dtype = getattr(torch, torch_dtype) if isinstance(torch_dtype, str) else torch_dtype
    with torch.device("meta"):
        model = auto_model_class(config).from_config(
            config, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
    return lora.apply(model, peft_config)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
