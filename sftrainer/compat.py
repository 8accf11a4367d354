"""TRL compatibility of the config: TRL 1.16 ``SFTConfig`` fields, their checks, and conversion.

``SFTConfig`` declares TRL's fields with TRL's names and defaults; this module checks their values
and turns a foreign ``TrainingArguments`` (a plain one, or a ``trl.SFTConfig``) into ``SFTConfig``
keyword arguments, so a TRL script's settings arrive intact. A TRL field sftrainer has no
counterpart for is named in one warning, never dropped silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

from sftrainer.constants import LOSS_TYPES
from sftrainer.errors import did_you_mean, warn_caller

DATASET_KWARGS = ("skip_prepare_dataset",)  # the only key TRL 1.16 reads
# TRL defaults that mean something else here: TRL's dataset_text_field="text" names the column of
# text rows and is ignored for other formats; sftrainer detects the format itself (None).
TRL_DEFAULTS_TO_DROP = {"dataset_text_field": "text"}


def trl_field_problems(cfg: Any) -> list[str]:
    """Problems with the TRL fields of an ``SFTConfig``, as 'key: problem'."""
    out = []
    choices = (*LOSS_TYPES, "chunked_nll")  # truncation_mode: checked with the other data settings
    if cfg.loss_type not in choices:
        out.append(
            f"loss_type: must be one of {choices}, got {cfg.loss_type!r}{did_you_mean(cfg.loss_type, choices)}"
        )
    kwargs = cfg.dataset_kwargs
    if kwargs is not None:
        unknown = [k for k in kwargs] if isinstance(kwargs, dict) else None
        if unknown is None:
            out.append(
                f"dataset_kwargs: must be a mapping like {{skip_prepare_dataset: true}}, got {kwargs!r}"
            )
        elif [k for k in unknown if k not in DATASET_KWARGS]:
            bad = next(k for k in unknown if k not in DATASET_KWARGS)
            out.append(
                f"dataset_kwargs: unknown key '{bad}'{did_you_mean(bad, DATASET_KWARGS)}; the only key is "
                "'skip_prepare_dataset' (as in TRL 1.16)"
            )
    coef = cfg.router_aux_loss_coef
    if coef is not None and (isinstance(coef, bool) or not isinstance(coef, int | float) or coef < 0):
        out.append(f"router_aux_loss_coef: must be a number >= 0 or null, got {coef!r}")
    if cfg.loss_type == "dft" and cfg.label_smoothing_factor:
        out.append(
            "loss_type: 'dft' weights the plain token losses; it cannot be combined with "
            "label_smoothing_factor (TRL ignores the smoothing silently)"
        )
    if cfg.use_liger_kernel:
        out.append(
            "use_liger_kernel: not supported: Liger's kernels replace the model's forward and its loss, which "
            "sftrainer computes itself (in chunks, never holding full-vocabulary logits: the memory Liger's "
            "fused cross-entropy saves) and checks for packed-row isolation; set use_liger_kernel=false"
        )
    return out


def normalise_trl_values(cfg: Any) -> None:
    """Resolve TRL's aliases in place: pad_to_multiple_of='auto' and loss_type='chunked_nll'."""
    if (
        cfg.pad_to_multiple_of == "auto"
    ):  # TRL pads to 128 on AWS Neuron only, which sftrainer does not target
        cfg.pad_to_multiple_of = None
    if cfg.loss_type == "chunked_nll":
        warn_caller(
            "`loss_type='chunked_nll'` is deprecated: it is TRL's alias of 'nll', which computes the loss the "
            "same way; use loss_type='nll'",
            FutureWarning,
        )
        cfg.loss_type = "nll"


def sft_values_from(args: Any, fields: Collection[str]) -> dict[str, Any]:
    """Keyword arguments for ``SFTConfig`` from another ``TrainingArguments`` (e.g. ``trl.SFTConfig``).

    Every field the two classes share is copied. The fields of ``args`` that sftrainer has no
    counterpart for, and that are set to something other than their default, are named in one
    warning (their default is what sftrainer does anyway).
    """
    theirs = [f for f in dataclasses.fields(args) if f.init and not f.name.startswith("_")]
    values = {f.name: getattr(args, f.name) for f in theirs if f.name in fields}
    for name, trl_default in TRL_DEFAULTS_TO_DROP.items():
        if name in values and values[name] == trl_default and type(args).__module__.startswith("trl."):
            values[name] = None
    ignored = [f.name for f in theirs if f.name not in fields and getattr(args, f.name) != _default(f)]
    if ignored:
        warn_caller(
            f"{type(args).__module__}.{type(args).__name__} sets {', '.join(ignored)}, which sftrainer does "
            "not support; these settings are ignored (see 'Switching from TRL' in the README)",
            UserWarning,
        )
    return values


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING
