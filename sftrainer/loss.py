"""Token-normalised causal-LM loss that never holds full-vocabulary logits.

In SFT most positions are prompt or padding, and the logits (positions x vocabulary, often the
largest tensor of the step) of all of them are thrown away by the loss. The default plan,
``chunked``, asks the model for the final hidden states of the trained positions only (through the
``logits_to_keep`` argument transformers models take, with the LM head's own computation skipped)
and computes the head, the softmax and the loss a chunk of positions at a time. Neither the forward
nor the backward pass holds a ``[tokens, vocabulary]`` tensor: for a plain ``nn.Linear`` head the
gradients of each chunk are computed as the chunk is (``_LinearCrossEntropy``); any other head (a
LoRA-wrapped or ``modules_to_save`` head) is called per chunk under activation checkpointing, so the
backward pass recomputes one chunk at a time. What models do to their logits after the head (final
soft-capping as in Gemma 2, ``logit_scale`` as in Cohere, ``logits_scaling`` as in Granite) is read
from the config and checked, once, against the model's own logits (``verify_chunked``); a model whose
logits the chunked loss does not reproduce falls back, with a warning, to ``lean``: the model's own
head on the trained positions.

The loss is the sum of token losses divided by ``num_items_in_batch`` (the trained tokens of the
whole optimizer step, counted by ``Trainer``), so gradient accumulation gives the gradients of one
big batch. ``loss_type="dft"`` weights each token loss by the detached probability of its target
(Dynamic Fine-Tuning, as TRL). The same pass counts what TRL logs: trained tokens, top-1 hits
(``mean_token_accuracy``) and entropy.

How the loss is computed is decided once per trainer (``plan_loss``), with the reason, and logged.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftrainer.constants import IGNORE_INDEX
from sftrainer.errors import ConfigError

logger = logging.getLogger(__name__)

CHUNK_LOGITS = 2**24  # logits per chunk (64 MiB in fp32) when loss_chunk_size is not set
CHUNK_POSITIONS = 2048  # positions per fp32 upcast when the model's own logits are used
# PEFT prompt-learning methods that prepend virtual token embeddings to the input (logits get longer).
PREPENDING_PEFT = ("PROMPT_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING")
CHUNKED, LEAN, FULL, TRAINER = "chunked", "lean", "full", "trainer"


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to the head's output: ``z = softcap * tanh(scale * x / softcap)``."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: Any) -> LogitTransform:
        config = _text_config(model)
        scale = 1.0
        for key in ("logit_scale", "output_multiplier", "lm_head_multiplier"):  # Cohere, Muse, Falcon-H1
            scale *= float(getattr(config, key, None) or 1.0)
        scaling = float(getattr(config, "logits_scaling", None) or 1.0)  # Granite, MiniCPM3 divide by it
        scale *= scaling if getattr(config, "model_type", "") == "hyperclovax" else 1.0 / scaling
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
        return cls(scale, float(softcap) if softcap else None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            x = x * self.scale
        if self.softcap is not None:
            x = torch.tanh(x / self.softcap) * self.softcap
        return x

    def backprop_(self, grad: torch.Tensor, z: torch.Tensor) -> None:
        """grad (d loss / d z, in place) becomes d loss / d x; z is the transformed logits."""
        if self.softcap is not None:
            grad.mul_(1.0 - (z / self.softcap).square())  # tanh' = 1 - tanh^2, tanh = z / softcap
        if self.scale != 1.0:
            grad.mul_(self.scale)

    def describe(self) -> str:
        parts = [f"x {self.scale:g}"] if self.scale != 1.0 else []
        parts += [f"soft-capped at {self.softcap:g}"] if self.softcap is not None else []
        return ", ".join(parts)


@dataclass(frozen=True)
class LossPlan:
    """How ``SFTTrainer.compute_loss`` computes the loss; see ``plan_loss``."""

    kind: str = CHUNKED  # chunked / lean / full: ours; trainer: Trainer's
    reason: str = ""
    loss_type: str = "nll"
    aux_coef: float = 0.0  # weight of the MoE load-balancing loss; 0: not added
    virtual_tokens: int = 0  # prompt tuning / p-tuning: the logits start with this many extra positions
    transform: LogitTransform = LogitTransform()
    chunk_size: int | None = None  # positions per chunk of the chunked loss; None: CHUNK_LOGITS / vocab
    verified: bool = False  # chunked: checked against the model's own logits (verify_chunked)

    def describe(self) -> str:
        chunk = f"{self.chunk_size} positions" if self.chunk_size else f"{CHUNK_LOGITS:,} logits"
        what = {
            CHUNKED: f"{self.loss_type} over trained tokens, from the final hidden states in chunks of "
            f"{chunk}; no full-vocabulary logits",
            LEAN: f"{self.loss_type} over trained tokens, logits at trained positions only",
            FULL: f"{self.loss_type} over trained tokens, from the full logits",
            TRAINER: "transformers.Trainer.compute_loss",
        }[self.kind]
        transform = self.transform.describe() if self.kind == CHUNKED else ""
        extra = f"; logits {transform}" if transform else ""
        extra += f"; + {self.aux_coef} x MoE load-balancing loss" if self.aux_coef else ""
        extra += f"; {self.virtual_tokens} virtual prompt tokens skipped" if self.virtual_tokens else ""
        return f"Loss: {what} ({self.reason}){extra}"


def accepts_logits_to_keep(model: Any) -> bool:
    return "logits_to_keep" in inspect.signature(_base(model).forward).parameters


def plan_loss(
    model: Any,
    loss_type: str = "nll",
    router_aux_loss_coef: float | None = None,
    compute_loss_func: Any = None,
    label_smoothing_factor: float = 0.0,
    chunk_size: int | None = None,
) -> LossPlan:
    """Decide, once, which loss the trainer computes and why. Raises ``ConfigError`` for impossible asks.

    Also makes the model's config agree with the MoE decision (as TRL does): ``output_router_logits``
    on exactly when the load-balancing loss is added, with its coefficient.
    """
    aux_coef = _router_aux_coef(model, router_aux_loss_coef)
    peft_config = getattr(model, "active_peft_config", None)
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", "")).upper()
    virtual = (
        int(peft_config.num_virtual_tokens) if peft_config is not None and peft_type in PREPENDING_PEFT else 0
    )
    if compute_loss_func is not None or label_smoothing_factor:
        if loss_type != "nll":
            raise ConfigError(f"loss_type='{loss_type}' cannot be combined with compute_loss_func")
        why = "compute_loss_func given" if compute_loss_func is not None else "label_smoothing_factor > 0"
        return LossPlan(
            TRAINER, f"{why}: it needs the full logits", aux_coef=aux_coef, virtual_tokens=virtual
        )
    if getattr(peft_config, "is_prompt_learning", False) and peft_type not in (
        *PREPENDING_PEFT,
        "PREFIX_TUNING",
    ):
        if loss_type != "nll":
            raise ConfigError(f"loss_type='{loss_type}' is not supported with PEFT {peft_type}")
        return LossPlan(TRAINER, f"PEFT {peft_type} computes its own loss", aux_coef=aux_coef)
    name = type(_base(model)).__name__
    plan = LossPlan(LEAN, "", loss_type, aux_coef, virtual, LogitTransform.of(model), chunk_size)
    if not accepts_logits_to_keep(model):
        return replace(plan, kind=FULL, reason=f"{name}.forward takes no logits_to_keep")
    if _output_head(model) is None:
        return replace(plan, reason=f"{name} has no output embeddings to compute logits from")
    return replace(plan, kind=CHUNKED, reason=f"{name} takes logits_to_keep")


def without_chunking(plan: LossPlan, why: str) -> LossPlan:
    """The ``lean`` plan (the model's own head on the trained positions) instead of ``chunked``.

    For engines that shard parameters (FSDP, DeepSpeed ZeRO-3): the head's weight exists in full only
    inside the head's own forward, so the chunked loss cannot use it.
    """
    return replace(plan, kind=LEAN, reason=why) if plan.kind == CHUNKED else plan


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model: Any) -> Any:
    config = _base(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _output_head(model: Any) -> torch.nn.Module | None:
    head = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module
    getter = getattr(head, "get_output_embeddings", None)
    return getter() if getter is not None else None


def _router_aux_coef(model: Any, coef: float | None) -> float:
    config = _text_config(model)
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
    for holder in (config, _base(model)):  # MoE models copy the coefficient from the config when built
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
    outputs: Any  # the model's outputs (logits of the positions computed; none for the chunked loss)
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
    if plan.kind == CHUNKED and not full_logits:
        keep = trained_positions(labels)  # [K]
        head = _output_head(model)
        assert head is not None  # plan_loss makes a chunked plan only for a model with an output head
        with _head_input(head) as captured:  # the head sees no positions: only its input is kept
            outputs = model(**model_inputs, logits_to_keep=keep + v)
        hidden = captured["hidden"]  # [B, K, H]
        targets = labels[:, keep + 1]  # [B, K]: the token each kept position predicts
        trained = targets != IGNORE_INDEX
        with _as_in_forward(captured):
            total, stats = linear_cross_entropy(head, hidden[trained], targets[trained], plan)
    else:
        if plan.kind in (CHUNKED, LEAN) and not full_logits:
            keep = trained_positions(labels)
            outputs = model(**model_inputs, logits_to_keep=keep + v)
            logits, targets = outputs.logits, labels[:, keep + 1]  # [B, K, V], [B, K]
        else:
            outputs = model(**model_inputs)
            logits = outputs.logits[:, v : v + labels.shape[1] - 1]  # [B, T - 1, V]
            targets = labels[:, 1:]
        total, stats = _logits_cross_entropy(logits, targets, plan.loss_type)
    if num_items_in_batch is None:
        num_items_in_batch = (labels[:, 1:] != IGNORE_INDEX).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device).clamp(min=1)
    return LossOutput(total / num_items_in_batch, outputs, stats)


def _logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, loss_type: str) -> tuple:
    """Summed loss and stats from logits the model computed ([B, K, V]), upcast a chunk at a time."""
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
        if loss_type == "dft":  # https://huggingface.co/papers/2508.05629
            losses = losses * torch.exp(-losses).detach()
        total = total + losses.sum()
        stats += token_stats(chunk, chunk_targets)
    return total, stats


@contextlib.contextmanager
def _head_input(head: torch.nn.Module, passthrough: bool = False) -> Iterator[dict[str, Any]]:
    """Capture the input of ``head`` during a forward pass (``hidden``) and the autocast dtype the head
    would compute in (``autocast``, None without autocast); unless ``passthrough``, the head then
    computes nothing (it is given zero positions), so no logits are built."""
    box: dict[str, Any] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
        device_type = args[0].device.type
        box["hidden"] = args[0]
        box["autocast"] = (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        )
        return None if passthrough else ((args[0].narrow(-2, 0, 0), *args[1:]), kwargs)

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def _as_in_forward(captured: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The autocast the model's forward ran under, for computing its head outside the forward.

    ``Trainer`` leaves mixed precision to accelerate, which autocasts the model's forward alone: the loss
    (``compute_loss``) runs outside it (transformers 5.x, accelerate 1.x). The head then computes in the
    dtype the model's own head would: bf16 matmuls (tensor cores) under bf16 autocast, not fp32 ones.
    """
    dtype = captured.get("autocast")
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(captured["hidden"].device.type, dtype=dtype)


def chunk_positions(plan: LossPlan, vocab: int) -> int:
    return plan.chunk_size or max(16, CHUNK_LOGITS // max(vocab, 1))


def linear_cross_entropy(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, plan: LossPlan
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed token loss of ``head(hidden)`` (after the plan's logit transform), and its stats.

    hidden: [N, H] final hidden states of trained positions, targets: [N]. At most one chunk of
    ``[chunk, vocabulary]`` logits (and its softmax) exists at a time, forward and backward.
    """
    if type(head) is torch.nn.Linear:
        weight, bias = head.weight, head.bias
        chunk = chunk_positions(plan, weight.shape[0])
        # A model spread over devices (device_map) may keep its head elsewhere than its last layer.
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        return _LinearCrossEntropy.apply(
            hidden, weight, bias, targets, plan.transform, chunk, plan.loss_type, torch.is_grad_enabled()
        )
    return _module_cross_entropy(head, hidden, targets, plan)


def _head_logits(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The head's output as ``linear_cross_entropy`` computes it."""
    if type(head) is torch.nn.Linear:
        return F.linear(hidden.to(head.weight.device), head.weight, head.bias)
    return head(hidden)


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``transform(hidden @ weight.T + bias)`` whose gradients are computed chunk by
    chunk in the forward pass (softmax minus one-hot, through the transform, times the head), so that
    no chunk's logits are kept for backward. Returns (summed loss, [3] stats)."""

    @staticmethod
    def forward(ctx: Any, hidden, weight, bias, targets, transform, chunk, loss_type, grad_enabled):
        # needs_input_grad ignores no_grad (evaluation): no gradients are computed there.
        want_h, want_w, want_b = (grad_enabled and want for want in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        stats = torch.zeros(3, dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            h, t = hidden[lo : lo + chunk], targets[lo : lo + chunk]
            raw = F.linear(h, weight, bias)  # [n, V], in the autocast dtype if one is active
            z = transform(raw.float())
            losses, probs = _chunk_losses(z, t, stats)
            if loss_type == "dft":
                weights = torch.exp(-losses)  # detached by construction
                losses = losses * weights
            total += losses.sum()
            if grad_h is None and grad_w is None and grad_b is None:
                continue
            probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d CE / d z = softmax - one-hot
            if loss_type == "dft":
                probs.mul_(weights[:, None])
            transform.backprop_(probs, z)
            del z
            grad = probs.to(raw.dtype)
            del probs, raw
            if grad_h is not None:
                grad_h[lo : lo + chunk] = grad @ weight.to(grad.dtype)
            if grad_w is not None:
                if grad.dtype == h.dtype == grad_w.dtype:
                    grad_w.addmm_(grad.t(), h)  # in place: no [vocabulary, hidden] temporary
                else:  # autocast: the product in its dtype, accumulated in fp32
                    grad_w += grad.t() @ h.to(grad.dtype)
            if grad_b is not None:
                grad_b += grad.sum(0)
        # Kept on ctx, not saved: they are outputs of this forward, scaled in place in backward.
        ctx.grads = (
            grad_h,
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
        )
        ctx.mark_non_differentiable(stats)
        return total, stats

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, _grad_stats: Any):
        if ctx.grads is None:
            raise RuntimeError("the chunked loss computes its gradients once: backward ran twice through it")
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return (*grads, None, None, None, None, None)


def _chunk_losses(z: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor) -> tuple:
    """Per-token cross-entropy of fp32 logits z [n, V] and the softmax; adds the chunk's stats."""
    with torch.no_grad():
        lse = torch.logsumexp(z, -1)  # [n]
        losses = lse - z.gather(1, targets[:, None]).squeeze(1)
        probs = (z - lse[:, None]).exp_()  # [n, V]
        entropy = lse - torch.bmm(probs[:, None, :], z[:, :, None]).view(-1)  # H = lse - sum(p * z)
        hits = (z.argmax(-1) == targets).sum()
        stats += torch.stack(
            [torch.tensor(float(len(targets)), device=z.device), hits.float(), entropy.sum()]
        )
    return losses, probs


def _module_cross_entropy(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, plan: LossPlan):
    """Any head module (LoRA-wrapped, modules_to_save): each chunk under activation checkpointing, so
    the backward pass recomputes one chunk's logits at a time instead of keeping them all."""
    chunk = chunk_positions(plan, _vocab_of(head, hidden))
    stats = torch.zeros(3, dtype=torch.float32, device=hidden.device)
    first_pass = [True]  # checkpointing calls the function again in backward: count stats once

    def chunk_loss(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        z = plan.transform(head(h).float())
        losses = F.cross_entropy(z, t, reduction="none")
        if first_pass[0]:
            _chunk_losses(z.detach(), t, stats)
        if plan.loss_type == "dft":
            losses = losses * torch.exp(-losses).detach()
        return losses.sum()

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for lo in range(0, hidden.shape[0], chunk):
        h, t = hidden[lo : lo + chunk], targets[lo : lo + chunk]
        if torch.is_grad_enabled():
            total = total + checkpoint(chunk_loss, h, t, use_reentrant=False)
        else:
            total = total + chunk_loss(h, t)
    first_pass[0] = False
    return total, stats


def _vocab_of(head: torch.nn.Module, hidden: torch.Tensor) -> int:
    out = getattr(head, "out_features", None)
    if out is None:
        with torch.no_grad():
            out = head(hidden[:1]).shape[-1] if len(hidden) else 1
    return int(out)


def verify_chunked(model: Any, input_ids: torch.Tensor, plan: LossPlan) -> LossPlan:
    """Check, once, that the chunked loss sees the logits the model itself computes.

    Runs the model on the first few tokens of ``input_ids`` and compares its logits with the plan's
    transform of its head applied to the captured hidden states. A model that does something else to
    its logits gets the ``lean`` plan (its own head, trained positions only), with a warning.
    """
    if plan.kind != CHUNKED or plan.verified:
        return plan
    head = _output_head(model)
    probe = input_ids[:1, :8]
    was_training = model.training
    model.eval()
    try:
        assert head is not None  # plan_loss makes a chunked plan only for a model with an output head
        with torch.no_grad(), _head_input(head, passthrough=True) as captured:
            theirs = model(input_ids=probe, use_cache=False).logits.float()
            # In the model's dtype (as it computes), with the head as the loss calls it.
            with _as_in_forward(captured):
                ours = plan.transform(_head_logits(head, captured["hidden"])).float().to(theirs.device)
    except Exception as error:  # a model that cannot run on a bare prompt: keep its own head
        problem = f"the probe forward failed ({type(error).__name__}: {error})"
    else:
        same_shape = theirs.shape == ours.shape
        gap = (theirs - ours).abs().max().item() if same_shape else float("inf")
        if gap <= 1e-3 * max(theirs.abs().max().item(), 1e-6):
            return replace(plan, verified=True)
        applied = f" {plan.transform.describe()}" if plan.transform.describe() else ""
        problem = f"its logits differ from head(hidden){applied} by {gap:.3g}"
    finally:
        model.train(was_training)
    name = type(_base(model)).__name__
    logger.warning(
        "Loss: the chunked loss does not reproduce %s's logits (%s); using the model's own LM head on "
        "the trained positions instead, which holds their full-vocabulary logits",
        name,
        problem,
    )
    return without_chunking(plan, f"{name}: {problem}")


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
