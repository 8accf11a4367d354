"""pytest configuration of the TRL test-suite harness (``bench/trl_suite/run.py`` copies this file
next to TRL's test file).

- Checks that ``trl`` is what the run asked for: the shim (sftrainer's classes) or TRL itself.
- ``lazy_shared_datadir``: the fixture pytest-datadir provides to TRL's tests (the test data
  directory, copied to a temporary one), here pointing at the harness's ``data/``.
- Tests the run does not count (``TRL_SUITE_SKIP``: JSON ``{test name pattern: reason}``) are
  deselected, and every outcome is appended to ``TRL_SUITE_RESULTS`` (JSON lines).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_configure(config):
    import trl

    target = os.environ.get("TRL_SUITE_TARGET", "sftrainer")
    from_shim = "trl_shim" in Path(trl.__file__).parts
    if (target == "sftrainer") != from_shim:
        raise pytest.UsageError(f"TRL_SUITE_TARGET={target} but `trl` was imported from {trl.__file__}")
    if target == "trl" and _CpuSFTConfig is not None:
        import trl.trainer.sft_trainer

        trl.SFTConfig = _CpuSFTConfig
        trl.trainer.sft_trainer.SFTConfig = _CpuSFTConfig  # the default SFTTrainer builds without args


def _cpu_sft_config():
    """TRL's ``bf16`` defaults to True, which transformers refuses without a bf16 GPU; TRL's tests run
    on GPU runners. For the baseline on a machine without one, an unset ``bf16`` means False (what
    sftrainer's default resolves to here). Only the ``--against trl`` run uses it."""
    from transformers.utils import is_torch_bf16_gpu_available

    if os.environ.get("TRL_SUITE_TARGET") != "trl" or is_torch_bf16_gpu_available():
        return None
    import trl

    class SFTConfig(trl.SFTConfig):
        def __post_init__(self):
            if self.bf16 is None and not self.fp16:
                self.bf16 = False
            super().__post_init__()

    SFTConfig.__qualname__ = "_CpuSFTConfig"  # picklable by name (Trainer saves its arguments)
    return SFTConfig


_CpuSFTConfig = _cpu_sft_config()


@pytest.fixture
def lazy_shared_datadir(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(HERE / "data", target)
    return target


def _name(item) -> str:
    return item.nodeid.split("::", 1)[1] if "::" in item.nodeid else item.nodeid


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    patterns = json.loads(os.environ.get("TRL_SUITE_SKIP", "{}"))
    keep, dropped = [], []
    for item in items:
        name = _name(item)  # an exact name (its [params] are not a character class), else a pattern
        reason = patterns.get(name) or next(
            (r for p, r in patterns.items() if fnmatch.fnmatchcase(name, p)), None
        )
        if reason is None:
            keep.append(item)
        else:
            dropped.append(item)
            _record(_name(item), "not counted", reason, 0.0)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


def _record(name: str, outcome: str, detail: str, seconds: float) -> None:
    path = os.environ.get("TRL_SUITE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(
                json.dumps({"test": name, "outcome": outcome, "detail": detail, "seconds": seconds}) + "\n"
            )


def pytest_runtest_logreport(report):
    name = report.nodeid.split("::", 1)[1] if "::" in report.nodeid else report.nodeid
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.skipped:
            detail = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.failed:
            outcome = "failed" if report.when == "call" else "error"
            lines = report.longreprtext.strip().splitlines()
            errors = [line[1:].strip() for line in lines if line.startswith("E ")]
            detail = " ".join(errors[:3]) if errors else (lines[-1] if lines else "")
        else:
            outcome, detail = "passed", ""
        _record(name, outcome, detail[:400], round(report.duration, 2))
