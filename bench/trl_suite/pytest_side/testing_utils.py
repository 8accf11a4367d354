"""The helpers TRL's ``tests/test_sft_trainer.py`` imports from its ``testing_utils`` module, written
here (TRL's module also imports TRL internals the sftrainer run must not need).

Each is a pytest skip / xfail condition or a small fixture holder with the meaning its name says.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Callable

import pytest
import torch
from transformers import is_bitsandbytes_available
from transformers.testing_utils import backend_device_count, torch_device
from transformers.utils import is_kernels_available, is_peft_available, is_vision_available


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _peft_target_parameters() -> bool:
    """PEFT's LoRA on parameters (``LoraConfig(target_parameters=...)``), added in PEFT 0.17."""
    if not is_peft_available():
        return False
    import dataclasses

    from peft import LoraConfig

    return "target_parameters" in {f.name for f in dataclasses.fields(LoraConfig)}


require_bitsandbytes = pytest.mark.skipif(
    not is_bitsandbytes_available(), reason="test requires bitsandbytes"
)
require_kernels = pytest.mark.skipif(not is_kernels_available(), reason="test requires kernels")
require_liger_kernel = pytest.mark.skipif(not _installed("liger_kernel"), reason="test requires liger-kernel")
require_peft = pytest.mark.skipif(not is_peft_available(), reason="test requires peft")
require_peft_target_parameters = pytest.mark.skipif(
    not _peft_target_parameters(), reason="test requires peft with LoraConfig(target_parameters=...)"
)
require_torch_accelerator = pytest.mark.skipif(
    torch_device is None or torch_device == "cpu", reason="test requires an accelerator"
)
require_torch_multi_accelerator = pytest.mark.skipif(
    backend_device_count(torch_device) <= 1, reason="test requires several accelerators"
)
require_vision = pytest.mark.skipif(not is_vision_available(), reason="test requires vision (Pillow)")
# Trainer wraps the model in nn.DataParallel when several accelerators are visible to one process.
xfail_data_parallel = pytest.mark.xfail(
    backend_device_count(torch_device) > 1, reason="nn.DataParallel (several accelerators, one process)"
)


def is_ampere_or_newer(device_index: int = 0) -> bool:
    """An NVIDIA GPU of compute capability 8.0 or more (flash attention kernels)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


class TrlTestCase:
    """Gives each test ``self.tmp_dir``, a fresh temporary directory."""

    @pytest.fixture(autouse=True)
    def set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def ignore_warnings(message: str | None = None, category: type[Warning] = Warning) -> Callable:
    """Run the test with warnings matching ``message`` / ``category`` ignored."""

    def decorator(test: Callable) -> Callable:
        @functools.wraps(test)
        def wrapper(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=message or "", category=category)
                return test(*args, **kwargs)

        return wrapper

    return decorator
