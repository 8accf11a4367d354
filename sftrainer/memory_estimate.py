"""An estimate of the peak memory of a training run: the tensors of training (weights, gradients,
optimizer state, activations, one chunk of the loss's logits) for a model's shape, batch, sequence
length and precision (the formula is ``estimate_memory``'s docstring), on top of what the process
holds when the estimate is made, measured (``baseline``: the process's resident memory on the CPU,
``torch.cuda.memory_allocated`` on CUDA). Used by the pre-flight (``sftrainer.preflight``).

What it leaves out: the CUDA context and the allocator's slack (often 0.5-1 GiB on a GPU), memory
the C allocator keeps after tensors are freed, optimizer temporaries during ``step()``, and, on the
CPU, the attention matrices SDPA's fallback kernel keeps with a mask (packed or padded rows).
Checked against a measured peak: ``preflight.memory_check`` (a CPU test, ``tests/test_memory_estimate.py``;
a GPU script can call it too), with the factors measured there.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

GiB = 1024**3

# Optimizer state per trainable parameter, by the start of TrainingArguments.optim: ("moments", n) is n
# tensors shaped and typed like the parameter (torch's optimizers keep their state in the parameter's
# dtype: float32 for sftrainer's master weights); ("bytes", n) is n bytes of quantized state.
OPTIMIZER_STATE = (
    ("adamw_torch_4bit", "bytes", 1),  # torchao: two 4-bit moments
    ("adamw_torch_8bit", "bytes", 2),
    ("adamw_8bit", "bytes", 2),
    ("paged_adamw_8bit", "bytes", 2),
    ("adamw_bnb_8bit", "bytes", 2),
    ("ademamix_8bit", "bytes", 3),
    ("paged_ademamix_8bit", "bytes", 3),
    ("lion_8bit", "bytes", 1),
    ("paged_lion_8bit", "bytes", 1),
    ("rmsprop_bnb_8bit", "bytes", 1),
    ("lion", "moments", 1),
    ("paged_lion", "moments", 1),
    ("ademamix", "moments", 3),
    ("paged_ademamix", "moments", 3),
    ("adafactor", "bytes", 0),  # factored second moments: O(rows + columns), not O(parameters)
    ("sgd", "bytes", 0),  # Trainer's SGD has no momentum buffer
    ("adagrad", "moments", 1),
    ("rmsprop", "moments", 1),
    ("adam", "moments", 2),  # adamw_torch, adamw_torch_fused, adamw_apex_fused, ...
    ("paged_adam", "moments", 2),
)


@dataclass
class ModelShape:
    """What the memory estimate needs of a model (read from a loaded or a meta-device model)."""

    params: int
    trainable: int
    trainable_bytes: int  # trainable parameters in the dtype they train in (their gradients' and state's)
    frozen_bytes: int  # frozen parameters in their own dtype
    fp32_params: int  # parameters stored in float32 (autocast keeps a half-precision copy of each)
    half_frozen: bool  # the frozen weights are bf16 / fp16
    hidden: int
    layers: int
    intermediate: int
    kv_dim: int  # width of K (and of V): kv_heads * head_dim
    heads: int
    vocab: int
    dropout_inputs: int = 0  # input features per token that adapter dropout copies (LoRA dropout > 0)


def model_shape(model: Any, master_weights: bool = False) -> ModelShape:
    """The shape of ``model`` as it trains. ``master_weights``: its trainable parameters will be
    float32 master weights (``precision.keep_master_weights``; a model not yet given to the trainer)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    params = trainable = trainable_bytes = frozen_bytes = fp32 = 0
    half = False
    for p in model.parameters():
        n = p.numel()
        params += n
        if p.requires_grad:
            trainable += n
            trainable_bytes += n * (4 if master_weights and p.dtype.is_floating_point else p.element_size())
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
        trainable_bytes=trainable_bytes,
        frozen_bytes=frozen_bytes,
        fp32_params=fp32,
        half_frozen=half,
        hidden=hidden,
        layers=int(getattr(config, "num_hidden_layers", 0) or 0),
        intermediate=int(getattr(config, "intermediate_size", None) or 4 * hidden),
        kv_dim=kv_heads * head_dim,
        heads=heads,
        vocab=int(getattr(config, "vocab_size", 0) or 0),
        dropout_inputs=_dropout_inputs(model),
    )


def _dropout_inputs(model: Any) -> int:
    """Input features per token of the adapter layers whose dropout copies their input (PEFT LoRA:
    ``lora_dropout`` with p > 0 keeps a dropped-out copy of the layer's input for backward)."""
    total = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        base = getattr(module, "base_layer", None)
        if dropouts is None or base is None or not hasattr(dropouts, "values"):
            continue
        if any(getattr(d, "p", 0) > 0 for d in dropouts.values()):
            total += int(getattr(base, "in_features", 0) or 0)
    return total


@dataclass
class MemoryEstimate:
    """Bytes of the tensors of training, and what the process held when the estimate was made."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int  # the logits alive at once: one chunk of the chunked loss, or all of them
    notes: list[str] = field(default_factory=list)
    optimizer_state: str = ""  # what the optimizer keeps, for the description
    baseline: int | None = None  # bytes the process held when the estimate was made, measured
    baseline_what: str = ""  # what ``baseline`` measured
    resident: int = 0  # bytes of the tensors above already inside ``baseline`` (weights on the GPU)
    logits_label: str = "logits"

    @property
    def total(self) -> int:
        """The tensors of training."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits

    @property
    def peak(self) -> int:
        """The baseline, and the tensors of training not yet inside it."""
        return (self.baseline or 0) + self.total - self.resident

    def describe(self) -> str:
        optimizer = f" ({self.optimizer_state})" if self.optimizer_state else ""
        parts = ", ".join(
            f"{name} {format_bytes(v)}{extra}"
            for name, v, extra in (
                ("weights", self.weights, ""),
                ("gradients", self.gradients, ""),
                ("optimizer", self.optimizer, optimizer),
                ("activations", self.activations, ""),
                (self.logits_label, self.logits, ""),
            )
        )
        if self.baseline is None:
            return f"{format_bytes(self.total)} of training tensors ({parts})"
        inside = f", {format_bytes(self.resident)} of them in it already" if self.resident else ""
        return (
            f"{format_bytes(self.peak)} = {format_bytes(self.baseline)} in use now ({self.baseline_what}) + "
            f"{format_bytes(self.total)} of training tensors{inside} ({parts})"
        )


def optimizer_state(optim: str, trainable: int, trainable_bytes: int) -> tuple[int, str]:
    """Bytes of optimizer state for ``trainable`` parameters taking ``trainable_bytes``, and what it is."""
    name = str(getattr(optim, "value", optim)).lower()
    kind, n = next(((k, n) for prefix, k, n in OPTIMIZER_STATE if name.startswith(prefix)), ("moments", 2))
    if kind == "bytes":
        return n * trainable, f"{n} byte{'s' if n != 1 else ''} per trainable parameter" if n else "none kept"
    size = trainable_bytes / trainable if trainable else 4
    dtype = {4: "float32", 2: "16-bit", 8: "float64"}.get(round(size), f"{size:g}-byte")
    return n * trainable_bytes, f"{n} {dtype} moment{'s' if n != 1 else ''} per trainable parameter"


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
    """Peak training memory of one device's tensors, an estimate: the sum of

    - weights: frozen ones in their dtype + trainable ones in theirs (float32 master weights), + 2 bytes
      per fp32 parameter under bf16/fp16 autocast (the half-precision copies autocast keeps while a
      step runs);
    - gradients: one per trainable parameter, in its dtype;
    - optimizer state in its real dtype: AdamW's two moments are shaped and typed like the trainable
      parameters; 8-bit AdamW keeps 2 bytes per parameter, SGD / Adafactor nothing (``OPTIMIZER_STATE``);
    - activations: ``b * s * L * (10 h + 3 kv + 4 i) * p`` bytes, the tensors a Llama-style block
      saves for backward per token (norm inputs and outputs, Q, K, V, attention output, gate, up,
      activation, product); ``p`` = 2 under bf16/fp16 (or a half-precision LoRA base), else 4; eager
      attention adds ``2 * b * heads * s^2 * p`` per layer (scores and probabilities); LoRA dropout
      adds ``b * s * (p + 1)`` per input feature of each adapted layer (the dropped-out copy and its
      mask); with gradient checkpointing ``L`` blocks keep only their input (``b * s * h * p`` each) plus
      one block's full set;
    - logits: ``n * (p + 8)`` for ``n`` logits alive at once (the head output, its fp32 copy for the
      loss and its gradient): ``n = b * s * V`` for a full-logits loss, at most ``logits_at_once``
      (one chunk) with sftrainer's chunked loss.

    b: per-device batch, s: the longest sequence (max_length when packing), L layers, h hidden,
    kv: width of K and V, i: MLP width, V: vocabulary. The module docstring says what is left out.
    """
    p = 2 if mixed_precision or shape.half_frozen else 4
    weights = shape.frozen_bytes + shape.trainable_bytes + (2 * shape.fp32_params if mixed_precision else 0)
    per_token_layer = 10 * shape.hidden + 3 * shape.kv_dim + 4 * shape.intermediate
    tokens = batch_size * seq_len
    attention = 2 * batch_size * shape.heads * seq_len * seq_len * p if eager_attention else 0
    dropout = tokens * shape.dropout_inputs * (p + 1)  # all layers
    full_layer = tokens * per_token_layer * p + attention + dropout // max(1, shape.layers)
    if gradient_checkpointing:
        activations = shape.layers * tokens * shape.hidden * p + full_layer
    else:
        activations = shape.layers * (tokens * per_token_layer * p + attention) + dropout
    notes = [f"b={batch_size}, s={seq_len}, activations in {'16' if p == 2 else '32'}-bit"]
    optimizer, what = optimizer_state(optim, shape.trainable, shape.trainable_bytes)
    return MemoryEstimate(
        weights=weights,
        gradients=shape.trainable_bytes,
        optimizer=optimizer,
        activations=activations,
        logits=min(tokens * shape.vocab, logits_at_once or tokens * shape.vocab) * (p + 8),
        notes=notes,
        optimizer_state=what,
    )


def process_memory() -> int | None:
    """This process's resident memory now (RSS), in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:  # Linux
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.Process().memory_info().rss)


def peak_process_memory() -> int:
    """This process's peak resident memory so far, in bytes (POSIX only): ``VmHWM`` on Linux, else
    ``ru_maxrss``. Not ``ru_maxrss`` on Linux: it carries the parent's resident memory at ``fork`` across
    ``exec``, so a fresh process started by a large one (a test runner, a launcher) would report the
    parent's size as its own peak."""
    import resource

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def meta_model(model_path: str, dtype: str, trust_remote_code: bool, peft_config: Any) -> Any:
    """The model's architecture on the meta device (no weights read, no memory), with LoRA applied."""
    import torch
    from transformers import AutoConfig

    import sftrainer.lora as lora
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
