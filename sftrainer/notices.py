"""Third-party notices that every command printed, shown at DEBUG only (``SFTRAINER_LOG_LEVEL=DEBUG``).

Each is logged by a dependency at import time on a machine where it is expected: an optional fast
path that is absent, or a deprecation only that dependency's authors can act on. They are matched
at their own logger, by their own words, so any other message of the same logger (and every
``warnings.warn``) still shows. Installed by ``import sftrainer``, before any of them is imported.
Each entry names the version it was found on.
"""

from __future__ import annotations

import logging
import re

# (logger, the start of the message as logged: ``record.getMessage()``, matched as a regular expression)
KNOWN_NOTICES: tuple[tuple[str, str], ...] = (
    # bitsandbytes 0.45 to 0.50.2 (backends/cpu/ops.py), imported by peft (helpers.py, reached through
    # transformers.trainer_utils) whenever it is installed: on a CPU with AVX512-BF16 it tries to
    # load a CPU kernel from the Hub through `kernels` (which transformers 5.25 installs), and warns
    # when that fails (no `kernels`, no network, an unverified publisher). It falls back to its own.
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # kernels 0.19.1 (_internals/hf_hub.py), the same attempt under HF_HUB_OFFLINE=1.
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
    # torchao 0.18.0 (__init__.py) loads every compiled extension it ships; on a CPU-only torch the
    # CUDA ones (_C_mxfp8, _C_cutlass_90a: MX formats and CUTLASS kernels, which sftrainer does not
    # use; its 4-/8-bit optimizers are pure PyTorch) fail, each with a warning. transformers 5.25
    # imports torchao whenever it is installed (sftrainer[torchao]).
    ("torchao", r"Failed to load \S*/torchao/_C\w*[\w.-]*\.so: Could not load this library"),
    # torchao 0.18.0 (kernel/intmm.py): its Triton int8 matmul is unavailable (CPU torch has no Triton).
    ("torchao.kernel.intmm", r"Warning: Detected no triton, on systems without Triton certain kernels"),
    # torch 2.13 (utils/_pytree.py) deprecates register_constant() on Enum subclasses, which
    # torchao 0.18.0 (utils.py) calls for its own enums (KernelPreference, ScaleCalculationMode).
    ("torch.utils._pytree", r"<enum '(KernelPreference|ScaleCalculationMode)'> is an Enum subclass and is now"),
)  # fmt: skip


class KnownNotice(logging.Filter):
    """Lets through every record of its logger but those matching ``pattern``, which become DEBUG
    records: shown only where that logger is enabled for DEBUG."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self.pattern.match(record.getMessage()):
            return True
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def install() -> None:
    """Add the filters (once: a second call adds none)."""
    for name, pattern in KNOWN_NOTICES:
        log = logging.getLogger(name)
        if not any(isinstance(f, KnownNotice) and f.pattern.pattern == pattern for f in log.filters):
            log.addFilter(KnownNotice(pattern))
