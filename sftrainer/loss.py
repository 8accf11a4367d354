"""Token-normalised causal-LM loss that computes logits only where a token is trained.

In SFT most positions are prompt or padding, and their logits (batch x length x vocabulary, often the
largest tensor of the step) are thrown away by the loss. The model is asked for the logits of the
trained positions only, through the ``logits_to_keep`` argument transformers models take, so the
LM head, the softmax and their gradients run on those positions alone. Everything the model does to
its logits (final soft-capping, scaling) still happens, since it is the model's own forward.

The loss is the sum of token losses divided by ``num_items_in_batch`` (the trained tokens of the
whole optimizer step, counted by ``Trainer``), so gradient accumulation gives the gradients of one
big batch. ``loss_type="dft"`` weights each token loss by the detached probability of its target
(Dynamic Fine-Tuning, as TRL). The same pass counts, without keeping any extra vocabulary-sized
tensor, what TRL logs: trained tokens, top-1 hits (``mean_token_accuracy``) and entropy.

How the loss is computed is decided once per trainer (``plan_loss``), with the reason, and logged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sftrainer.constants import IGNORE_INDEX
from sftrainer.errors import ConfigError

CHUNK_POSITIONS = 2048  # positions per fp32 upcast of the logits: bounds the fp32 copy for bf16 models
# PEFT prompt-learning methods that prepend virtual token embeddings to the input (logits get longer).
PREPENDING_PEFT = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
LEAN, FULL, TRAINER = "lean", "full", "trainer"


@dataclass(frozen=True)
class LossPlan:
    """How ``SFTTrainer.compute_loss`` computes the loss; see ``plan_loss``."""

    kind: str = LEAN  # lean: ours, trained positions' logits; full: ours, all logits; trainer: Trainer's
    reason: str = ""
    loss_type: str = "nll"
    aux_coef: float = 0.0  # weight of the MoE load-balancing loss; 0: not added
    virtual_tokens: int = 0  # prompt tuning / p-tuning: the logits start with this many extra positions

    def describe(self) -> str:
        what = {
            LEAN: f"{self.loss_type} over trained tokens, logits at trained positions only",
            FULL: f"{self.loss_type} over trained tokens, from the full logits",
            TRAINER: "transformers.Trainer.compute_loss",
        }[self.kind]
        extra = f"; + {self.aux_coef} x MoE load-balancing loss" if self.aux_coef else ""
        extra += f"; {self.virtual_tokens} virtual prompt tokens skipped" if self.virtual_tokens else ""
        return f"Loss: {what} ({self.reason}){extra}"


def accepts_logits_to_keep(model: Any) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def plan_loss(
    model: Any,
    loss_type: str = "nll",
    router_aux_loss_coef: float | None = None,
    compute_loss_func: Any = None,
    label_smoothing_factor: float = 0.0,
) -> LossPlan:
    """Decide, once, which loss the trainer computes and why. Raises ``ConfigError`` for impossible asks.

    Also makes the model's config agree with the MoE decision (as TRL does): ``output_router_logits``
    on exactly when the load-balancing loss is added, with its coefficient.
    """
    aux_coef = _router_aux_coef(model, router_aux_loss_coef)
    peft_config = getattr(model, "active_peft_config", None)
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", "")).upper()
    virtual = int(peft_config.num_virtual_tokens) if peft_type in PREPENDING_PEFT else 0
    if compute_loss_func is not None or label_smoothing_factor:
        if loss_type != "nll":
            raise ConfigError(f"loss_type='{loss_type}' cannot be combined with compute_loss_func")
        why = "compute_loss_func given" if compute_loss_func is not None else "label_smoothing_factor > 0"
        return LossPlan(TRAINER, f"{why}: it needs the full logits", virtual_tokens=virtual)
    if getattr(peft_config, "is_prompt_learning", False) and peft_type not in (
        *PREPENDING_PEFT,
        "PREFIX_TUNING",
    ):
        if loss_type != "nll":
            raise ConfigError(f"loss_type='{loss_type}' is not supported with PEFT {peft_type}")
        return LossPlan(TRAINER, f"PEFT {peft_type} computes its own loss")
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if accepts_logits_to_keep(model):
        return LossPlan(LEAN, f"{name} takes logits_to_keep", loss_type, aux_coef, virtual)
    return LossPlan(FULL, f"{name}.forward takes no logits_to_keep", loss_type, aux_coef, virtual)


def _router_aux_coef(model: Any, coef: float | None) -> float:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    is_moe = hasattr(config, "output_router_logits")
    if coef and not is_moe:
        raise ConfigError(
            f"router_aux_loss_coef={coef}: {type(model).__name__} is not a Mixture-of-Experts model that "
            "returns router logits, so there is no load-balancing loss to weight"
        )
    if not is_moe:
        return 0.0
    coef = float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else float(coef)
    config.output_router_logits = coef != 0.0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for holder in (config, base):  # MoE models copy the coefficient from the config when built
        if hasattr(holder, "router_aux_loss_coef"):
            holder.router_aux_loss_coef = coef
    return coef


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p whose logits are trained: those where label p + 1 is not ignored, in any row.

    labels: [B, T] (not shifted). Returns a 1-D index tensor into the sequence dimension.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with grad
    outputs: Any  # the model's outputs (logits of the positions computed)
    stats: torch.Tensor  # [3] detached: trained tokens, top-1 hits, summed entropy


def sft_loss(
    model: Any,
    inputs: dict[str, Any],
    num_items_in_batch: Any = None,
    plan: LossPlan = LossPlan(),
    full_logits: bool = False,
) -> LossOutput:
    """Sum of the trained tokens' losses / number of trained tokens, plus their statistics.

    ``full_logits`` (or a ``full`` plan) computes every position's logits, e.g. for ``compute_metrics``.
    """
    labels = inputs["labels"]  # [B, T]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if plan.aux_coef:
        model_inputs["output_router_logits"] = True
    v = plan.virtual_tokens
    if plan.kind == LEAN and not full_logits:
        keep = trained_positions(labels)  # [K]
        outputs = model(**model_inputs, logits_to_keep=keep + v)
        logits = outputs.logits  # [B, K, V]
        targets = labels[:, keep + 1]  # [B, K]: the token each kept position predicts
    else:
        outputs = model(**model_inputs)
        logits = outputs.logits[:, v : v + labels.shape[1] - 1]  # [B, T - 1, V]
        targets = labels[:, 1:]
    total = logits.new_zeros((), dtype=torch.float32)
    stats = logits.new_zeros(3, dtype=torch.float32)
    for lo in range(0, targets.shape[1], CHUNK_POSITIONS):
        chunk = logits[:, lo : lo + CHUNK_POSITIONS].float()
        chunk_targets = targets[:, lo : lo + CHUNK_POSITIONS]
        losses = F.cross_entropy(  # [B * k]; 0 where ignored
            chunk.reshape(-1, chunk.shape[-1]),
            chunk_targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        )
        if plan.loss_type == "dft":  # https://huggingface.co/papers/2508.05629
            losses = losses * torch.exp(-losses).detach()
        total = total + losses.sum()
        stats += token_stats(chunk, chunk_targets)
    if num_items_in_batch is None:
        num_items_in_batch = (targets != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device).clamp(min=1)
    return LossOutput(total / num_items_in_batch, outputs, stats)


@torch.no_grad()
def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[trained tokens, top-1 hits, summed entropy] of the positions whose target is not ignored.

    logits: [B, K, V] (any float dtype), targets: [B, K]. Works through ``CHUNK_POSITIONS`` positions at
    a time, so at most a chunk's worth of fp32 vocabulary-sized temporaries exists at once.
    """
    out = torch.zeros(3, dtype=torch.float32, device=logits.device)
    for lo in range(0, targets.shape[1], CHUNK_POSITIONS):
        x = logits[:, lo : lo + CHUNK_POSITIONS].float()  # [B, k, V]; no copy when already fp32
        target = targets[:, lo : lo + CHUNK_POSITIONS]  # [B, k]
        trained = target != IGNORE_INDEX
        lse = x.logsumexp(-1)  # [B, k]
        probs = (x - lse[..., None]).exp_()  # [B, k, V]
        entropy = lse - (probs * x).sum(-1)  # H = logsumexp(x) - sum(p * x)
        hits = (x.argmax(-1) == target) & trained
        out += torch.stack([trained.sum(), hits.sum(), (entropy * trained).sum()]).float()
    return out
