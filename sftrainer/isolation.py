"""Check that rows sharing a packed / padding-free batch are independent of each other.

The property, checked rather than assumed from a list of backends: a row's logits must not change
when the row packed before it changes. ``check_row_isolation`` lays out one row after two different
neighbours (different lengths and tokens), exactly as the collator lays out training batches (one
flat row for padding-free / FlashAttention, separate padded rows of packed sequences otherwise), runs
the model once on that batch and once on the row alone, and requires

- independence: the row's logits after neighbour A equal those after neighbour B, to float noise;
- and the row's logits equal those of the row alone, within the precision's tolerance.

Comparing with the row alone only ("close within 1e-3") let real leaks through: LFM2's short
convolutions move a packed row's logits by 4e-4 on a tiny random model. Tolerances are relative to
``max(1, max |logit|)`` of the row alone, set from what ``tests/test_isolation.py`` measures and prints
(CPU; 2-layer hidden-64 Llama, Mistral, Gemma, Phi-3, Qwen2 and an 8-layer hidden-512 Llama; eager
and SDPA; both layouts; no GPU was available to measure on):

=================  =================================  ============  =========
compute            largest noise (neighbour / alone)  independence  row alone
=================  =================================  ============  =========
float32            5.6e-7 / 7.0e-7                    1e-5          1e-4
float16 autocast   8.4e-4 / 8.4e-4                    3e-2          3e-2
bfloat16 autocast  6.7e-3 / 6.7e-3                    3e-2          3e-2
=================  =================================  ============  =========

Leaks on the same tiny models, float32 (bfloat16): LFM2 4e-4 (1.8e-3), Falcon-H1 1.7e-3 (2e-3),
Qwen3.5 7e-2, Qwen3-Next 0.2, Mamba, Mamba-2, NemotronH, Granite 4 0.4 - 1.2 (the same). float32's
bound is about 20x its noise and 40x under the smallest leak. Reduced precision (bf16, fp16, TF32
matmuls) cannot tell LFM2's leak from rounding, so a model with layers that carry state along the
sequence is checked in float32 as well (autocast off, no TF32 matmuls) when it trains in reduced
precision, and refused when its weights are not all float32 and isolation cannot be proven.

Layers that carry state along the sequence (causal convolutions; Mamba, linear-attention and gated
DeltaNet recurrences) are found from the model itself (``stateful_layers``), to name them and to ask
for that float32 proof; the probe decides. transformers 5.25 keeps such layers apart only through CUDA
kernels (causal-conv1d, mamba-ssm, flash-linear-attention) given ``seq_idx`` / ``cu_seq_lens`` in the
batch, which sftrainer's packed batches do not carry, so today the probe refuses every family that has
them, on every device; a model whose stateful layers do keep rows apart passes and trains packed. A
refusal gives attention-backend advice only when the leak is the attention backend's: when it goes
away with eager attention.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sftrainer.errors import ContaminationError

logger = logging.getLogger(__name__)

# transformers 5.x's names for layers whose output at a position depends on a state carried from
# earlier positions (masking_utils gives them the recurrent mask); "mamba" is their legacy name.
STATEFUL_LAYER_TYPES = frozenset({"conv", "linear_attention", "hybrid", "hybrid_sliding", "mamba"})

# Relative to max(1, max |logit|) of the row alone; measurements in the module docstring.
FP32_INDEPENDENCE = 1e-5  # neighbour A vs neighbour B; noise <= 5.6e-7
FP32_ALONE = 1e-4  # packed vs alone: different shapes take different kernels; noise <= 7.0e-7
REDUCED_TOLERANCE = 3e-2  # both, in bf16 / fp16 / TF32; noise <= 6.7e-3
_RESET = "Set packing=False and padding_free=False (and eval_packing=False)."


@dataclass(frozen=True)
class Probe:
    """What one probe measured, each relative to ``max(1, max |logit|)`` of the row alone."""

    neighbour: float  # max |logit change| of the row when the row before it changes
    alone: float  # max |logit difference| between the packed row and the row alone
    precision: str  # what it computed in: "float32", "bfloat16", "float16", ...

    @property
    def reduced(self) -> bool:
        return self.precision != "float32"

    def isolated(self) -> bool:
        if self.reduced:
            return self.neighbour <= REDUCED_TOLERANCE and self.alone <= REDUCED_TOLERANCE
        return self.neighbour <= FP32_INDEPENDENCE and self.alone <= FP32_ALONE

    def describe(self) -> str:
        """How far a row's logits moved, relative to the largest: what the messages quote."""
        return (
            f"a row's logits move by {self.neighbour:.2g} when the row before it changes and differ by "
            f"{self.alone:.2g} from the row alone, in {self.precision}"
        )


def stateful_layers(model: Any) -> list[str]:
    """The layers of ``model`` that carry state along the sequence, as ``"ClassName ('layer_type')"``.

    Found from the model: modules with a recurrent ``layer_type`` (what transformers 5.x sets on its
    LFM2 / Mamba / hybrid / gated DeltaNet mixers), modules that own a depthwise ``Conv1d`` (a causal
    convolution over positions, e.g. Jamba's and RecurrentGemma's), and recurrent ``layer_types`` in
    the config when no module says which. Empty for plain attention models.
    """
    found: dict[str, str] = {}
    for module in model.modules():
        kind = getattr(module, "layer_type", None)
        if isinstance(kind, str) and kind in STATEFUL_LAYER_TYPES:
            found.setdefault(type(module).__name__, f"'{kind}'")
        elif any(_is_sequence_convolution(child) for child in module.children()):
            found.setdefault(type(module).__name__, "a causal convolution")
    if not found:
        config: Any = getattr(model, "config", None)  # a transformers config, or None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        kinds = sorted({k for k in getattr(text, "layer_types", None) or [] if k in STATEFUL_LAYER_TYPES})
        return [f"layer_types '{k}'" for k in kinds]
    return [f"{name} ({kind})" for name, kind in found.items()]


@torch.no_grad()
def check_row_isolation(model: Any, collator: Any, compute_dtype: torch.dtype | None = None) -> None:
    """Raise ``ContaminationError`` unless packed rows are independent. Costs two tiny forward passes
    (four for a model with stateful layers training in reduced precision; more only to explain a leak).

    Run it where training runs (the model on its training device, under the training autocast), as
    ``SFTTrainer`` does at the start of ``train()``: whether a backend isolates rows can depend on the
    device and kernel. ``compute_dtype``: the autocast dtype, if any (sets the tolerance).
    ``collator``: one of sftrainer's position collators; its ``flatten`` picks the layout.
    """
    layers = stateful_layers(model)
    device = next(model.parameters()).device
    precision = _precision(model, compute_dtype)
    probe = probe_rows(model, collator, precision)
    if probe.isolated() and layers and probe.reduced:
        # Reduced precision hides leaks the size of LFM2's: prove it in float32, or refuse.
        if not _all_float32(model):
            raise ContaminationError(_unproven_message(model, layers, probe))
        with _float32(device):
            probe = probe_rows(model, collator, "float32")
    if not probe.isolated():
        raise ContaminationError(_leak_message(model, collator, layers, probe, device))
    logger.info(
        "Packed rows are isolated with attn_implementation='%s' on %s in %s (%s)",
        attn_implementation(model),
        device,
        precision,
        probe.describe(),
    )


@torch.no_grad()
def probe_rows(model: Any, collator: Any, precision: str = "float32") -> Probe:
    """Measure, without judging: one 5-token row after two different neighbours (7 and 4 tokens), laid
    out by ``collator`` (``flatten``: one flat row [first | row | second | row]; else two padded rows
    [first | row], [second | row]), in one forward pass, and the row alone in another. Runs under the
    caller's autocast. ``precision``: what the caller computes in (sets ``Probe.isolated``'s tolerance).
    """
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    row, first, second = (torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 7, 4))
    if collator.flatten:  # one flat row: [first | row | second | row]
        batch = collator([{"input_ids": ids} for ids in (first, row, second, row)])
        spans = [(0, 7), (0, 16)]
    else:  # two padded rows, each a packed sequence: [first | row], [second | row + padding]
        features = [
            {"input_ids": ids + row, "position_ids": [*range(len(ids)), *range(len(row))]}
            for ids in (first, second)
        ]
        batch = collator(features)
        spans = [(0, 7), (1, 4)]
    logits = forward_logits(model, batch)
    alone = forward_logits(model, {"input_ids": torch.tensor([row])})[0]
    after_first, after_second = (logits[r, start : start + len(row)] for r, start in spans)
    scale = max(1.0, alone.abs().max().item())
    return Probe(
        neighbour=(after_first - after_second).abs().max().item() / scale,
        alone=max((after_first - alone).abs().max().item(), (after_second - alone).abs().max().item())
        / scale,
        precision=precision,
    )


def forward_logits(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The float32 logits of ``batch`` (labels ignored), run as the probes run it: in eval mode (the
    model's mode restored after), on the model's device, with ``use_cache=False`` as in training
    (``SFTTrainer.compute_loss``): with a cache, transformers skips the packed-sequence mask."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
    was_training = model.training
    model.eval()
    try:
        return model(**inputs, use_cache=False).logits.float()
    finally:
        model.train(was_training)


def _leak_message(model: Any, collator: Any, layers: list[str], probe: Probe, device: torch.device) -> str:
    impl = attn_implementation(model)
    name = model_name(model)
    if layers:
        return (
            f"packing / padding_free: {name} has layers that carry state along the sequence "
            f"({', '.join(layers)}), and on {device} nothing resets it where a packed row starts: "
            f"{probe.describe()}. Training would carry each row's context into the next. transformers keeps "
            "such layers apart only through CUDA kernels given seq_idx / cu_seq_lens, which sftrainer's "
            f"batches do not carry. {_RESET}"
        )
    if impl != "eager" and _probe_with_eager(model, collator, probe.precision).isolated():
        return (
            f"packing / padding_free: packed rows attend to each other with attn_implementation='{impl}' "
            f"({probe.describe()}; with 'eager' they do not), so training would see cross-row context. "
            "Use attn_implementation 'sdpa', 'eager', 'flex_attention' or 'flash_attention_2' "
            f"(model.attn_implementation in YAML), or {_RESET[0].lower()}{_RESET[1:]}"
        )
    also = (
        ""
        if impl == "eager"
        else f" (also with attn_implementation='eager' instead of '{impl}': not the attention backend)"
    )
    return (
        f"packing / padding_free: the rows of a packed batch see each other in {name}{also}: "
        f"{probe.describe()}. Training would see cross-row context. {_RESET}"
    )


def _unproven_message(model: Any, layers: list[str], probe: Probe) -> str:
    return (
        f"packing / padding_free: {model_name(model)} has layers that carry state along the sequence "
        f"({', '.join(layers)}): {probe.describe()}, within rounding ({REDUCED_TOLERANCE:g}), which hides the "
        "leaks such layers have (LFM2's: 4e-4), and its weights are not all float32, so isolation cannot be "
        f"checked in float32 either. {_RESET}"
    )


def _probe_with_eager(model: Any, collator: Any, precision: str) -> Probe:
    """The probe with eager attention, which reads the block-diagonal mask transformers builds from
    ``position_ids``: a leak that goes away is the attention backend's."""
    configs: dict[int, Any] = {
        id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")
    }
    saved = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for config in configs.values():
            _set_attn_implementation(config, "eager")
        return probe_rows(model, collator, precision)
    finally:
        for key, config in configs.items():
            _set_attn_implementation(config, saved[key])


def _set_attn_implementation(config: Any, value: str | None) -> None:
    # On this config only: transformers' setter would also reset the sub-configs, which have their own.
    internal = hasattr(config, "_attn_implementation_internal")
    setattr(config, "_attn_implementation_internal" if internal else "_attn_implementation", value)


@contextlib.contextmanager
def _float32(device: torch.device) -> Iterator[None]:
    """Float32 on ``device``: autocast off, no TF32 matmuls (cuDNN's convolutions keep their setting)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


def _is_sequence_convolution(module: Any) -> bool:
    """A depthwise ``Conv1d`` with a kernel wider than one position: mixes neighbouring positions."""
    return (
        isinstance(module, torch.nn.Conv1d)
        and module.kernel_size[0] > 1
        and module.groups == module.in_channels > 1
    )


def _precision(model: Any, compute_dtype: torch.dtype | None) -> str:
    """What a forward pass computes in, as messages name it: the autocast dtype if any, else the
    weights' (a bf16 base under float32 adapters computes in bf16; a quantized one in its quantizer's
    compute dtype, bf16 on most GPUs), else float32, with its matmul precision."""
    dtypes = {compute_dtype} if compute_dtype is not None else {p.dtype for p in model.parameters()}
    reduced = next((d for d in dtypes if d != torch.float32 and d.is_floating_point), None)
    if reduced is not None:
        return str(reduced).removeprefix("torch.")
    if any(not d.is_floating_point for d in dtypes):
        return "the quantized weights' compute dtype"
    matmuls = torch.get_float32_matmul_precision()  # "high": TF32, "medium": bfloat16 internally
    return "float32" if matmuls == "highest" else f"float32 with '{matmuls}' matmul precision"


def _all_float32(model: Any) -> bool:
    """Every weight float32 (a quantized base is not): then the model can run in float32."""
    return all(p.dtype == torch.float32 for p in model.parameters())


def attn_implementation(model: Any) -> str:
    """The attention backend the model's config names, as messages quote it."""
    return getattr(model.config, "_attn_implementation", None) or "unknown"


def model_name(model: Any) -> str:
    """The class name of the model (of the base model under a PEFT wrapper), as messages quote it."""
    return type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
