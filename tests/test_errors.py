"""Warnings about the caller's arguments point at the caller's line (``errors.warn_caller``), however
deep in sftrainer / transformers / dataclass ``__init__`` code they are raised."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from tiny_models import ROWS
from transformers import TrainingArguments

from sftrainer import SFTConfig, SFTTrainer
from sftrainer.errors import warn_caller
from sftrainer.precision import has_accelerator

needs_cpu_only = pytest.mark.skipif(has_accelerator(), reason="fp16 is kept where an accelerator exists")


def _caught(make) -> tuple[list[warnings.WarningMessage], int]:
    """The warnings ``make()`` raises, and the line of ``make`` (a one-line lambda: the call's line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make()
    return caught, make.__code__.co_firstlineno


def _only(caught: list[warnings.WarningMessage], words: str) -> warnings.WarningMessage:
    matching = [w for w in caught if words in str(w.message)]
    assert len(matching) == 1, [str(w.message) for w in caught]
    return matching[0]


def test_warn_caller_skips_sftrainer_frames():
    def inner():  # this file is outside the package: the warning points here
        warn_caller("look here")

    caught, _ = _caught(inner)
    assert _only(caught, "look here").filename == __file__


@needs_cpu_only
def test_fp16_without_a_gpu_points_at_the_sftconfig_call(tmp_path):
    caught, line = _caught(lambda: SFTConfig(output_dir=str(tmp_path), fp16=True))
    w = _only(caught, "fp16=True needs a GPU")
    assert (w.filename, w.lineno) == (__file__, line)


def test_deprecated_max_seq_length_points_at_the_caller(tmp_path):
    caught, line = _caught(lambda: SFTConfig(output_dir=str(tmp_path), max_seq_length=64))
    w = _only(caught, "max_seq_length is deprecated")
    assert (w.filename, w.lineno) == (__file__, line)


@needs_cpu_only
def test_sfttrainer_converting_training_arguments_points_at_the_trainer_call(
    tiny_model_dir, tokenizer, tmp_path
):
    args = TrainingArguments(output_dir=str(tmp_path), fp16=True, report_to=[])

    def build():
        SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, processing_class=tokenizer)

    caught, _ = _caught(build)
    assert _only(caught, "fp16=True needs a GPU").filename == __file__


def test_sfttrainer_older_style_and_ignored_settings_point_at_the_caller(tiny_model_dir, tokenizer, tmp_path):
    @dataclasses.dataclass
    class OtherArgs(TrainingArguments):
        other_setting: int = 0

    args = OtherArgs(output_dir=str(tmp_path), report_to=[], other_setting=3)

    def build():
        SFTTrainer(model=str(tiny_model_dir), args=args, train_dataset=ROWS, tokenizer=tokenizer)

    caught, _ = _caught(build)
    assert _only(caught, "older TRL style").filename == __file__
    assert _only(caught, "other_setting").filename == __file__
