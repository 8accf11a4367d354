"""Precision: trainable weights are fp32 master weights, frozen ones keep their dtype, autocast is
chosen from the hardware through ``torch.accelerator`` (not CUDA alone). Tiny models, CPU, seconds.

The learning rate is TRL's default 2e-5: far below bf16's resolution (a weight of 1.0 moves in steps
of 0.0078), so a bf16 weight updated in place would keep its value.
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import ROWS, changed, quick_args, save_tiny_model, trainable_snapshot
from transformers import AutoModelForCausalLM

from sftrainer import SFTTrainer, precision
from sftrainer.precision import MixedPrecision, choose_mixed_precision
from sftrainer.run_config import load_config

# peft 0.21 reads an attribute transformers 5 deprecated (sftrainer silences it in its own calls).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

LR = 2e-5


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **kw})


@pytest.fixture
def bf16_dir(tokenizer, tmp_path):
    return save_tiny_model("llama", tokenizer, tmp_path / "bf16-model", dtype=torch.bfloat16)


def all_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_every_trainable_weight_moved(trainer: SFTTrainer) -> None:
    """Every trainable tensor changes, and so does every element of every norm weight (each gets a
    gradient every step): the update of a bf16 norm weight of 1.0 would round away."""
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert sorted(changed(trainer.model, before)) == sorted(before)
    now = dict(trainer.model.named_parameters())
    norms = [n for n in before if "norm" in n]
    assert norms
    for name in norms:
        assert (now[name].detach() != before[name]).all(), f"{name}: some elements never moved"


# ---- full fine-tuning of a bf16 checkpoint ----------------------------------------------------


@pytest.mark.parametrize("init_kwargs", [None, {"dtype": "bfloat16"}], ids=["auto", "explicit-bf16"])
def test_full_finetune_of_bf16_checkpoint_moves_every_weight(bf16_dir, tmp_path, init_kwargs):
    args = quick_args(tmp_path / "run", learning_rate=LR, model_init_kwargs=init_kwargs)
    trainer = SFTTrainer(model=str(bf16_dir), args=args, train_dataset=ROWS)
    assert_every_trainable_weight_moved(trainer)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}


def test_master_weights_train_exactly_like_an_fp32_model(bf16_dir, tmp_path):
    """From a bf16 checkpoint, the result is bit-identical to fine-tuning its fp32 upcast."""
    from_bf16 = SFTTrainer(
        model=str(bf16_dir), args=quick_args(tmp_path / "a", learning_rate=LR), train_dataset=ROWS
    )
    fp32 = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    from_fp32 = SFTTrainer(model=fp32, args=quick_args(tmp_path / "b", learning_rate=LR), train_dataset=ROWS)
    from_bf16.train()
    from_fp32.train()
    for (name, a), (_, b) in zip(from_bf16.model.named_parameters(), from_fp32.model.named_parameters()):
        assert torch.equal(a, b), name


def test_bf16_model_object_is_converted_openly(bf16_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype="auto")
    assert model.dtype == torch.bfloat16
    with caplog.at_level(logging.INFO, logger="sftrainer.precision"):
        trainer = SFTTrainer(
            model=model, args=quick_args(tmp_path / "run", learning_rate=LR), train_dataset=ROWS
        )
    # The caller's object, converted in place (no second copy of the weights), and said so once.
    assert trainer.model is model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    notes = [r for r in caplog.records if r.name == "sftrainer.precision"]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    message = notes[0].getMessage()
    for words in ("bfloat16", "float32", "in place", "LoRA"):
        assert words in message, message
    assert_every_trainable_weight_moved(trainer)


def test_fp32_model_is_left_alone(tiny_model, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="sftrainer.precision"):
        SFTTrainer(model=tiny_model, args=quick_args(tmp_path / "run"), train_dataset=ROWS)
    assert not [r for r in caplog.records if r.name == "sftrainer.precision"]


# ---- LoRA: the frozen base keeps its dtype, adapters are fp32 -----------------------------------


def test_lora_on_bf16_checkpoint_trains_fp32_adapters_on_an_untouched_bf16_base(bf16_dir, tmp_path):
    trainer = SFTTrainer(
        model=str(bf16_dir),
        args=quick_args(tmp_path / "run", learning_rate=LR),
        train_dataset=ROWS,
        peft_config=lora(),
    )
    before = all_params(trainer.model)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    trainer.train()
    assert sorted(changed(trainer.model, before)) == sorted(trainable)
    for name, param in trainer.model.named_parameters():
        if name in trainable:
            assert param.dtype == torch.float32, name  # peft's autocast_adapter_dtype
        else:
            assert param.dtype == torch.bfloat16, name
            assert torch.equal(param, before[name]), name  # bit-identical


@pytest.mark.parametrize(
    ("mixed", "base_dtype"),
    [({}, torch.float32), ({"bf16": True, "use_cpu": True}, torch.bfloat16)],
    ids=["no-autocast", "bf16-autocast"],
)
def test_lora_modules_to_save_on_bf16_base_are_fp32(bf16_dir, tmp_path, mixed, base_dtype):
    """A fully trained module (modules_to_save) is fp32 too. Under autocast the base stays bf16;
    without it fp32 and bf16 operands cannot meet in one op, so the whole model is fp32."""
    trainer = SFTTrainer(
        model=str(bf16_dir),
        args=quick_args(tmp_path / "run", learning_rate=LR, **mixed),
        train_dataset=ROWS,
        peft_config=lora(modules_to_save=["lm_head"]),
    )
    trainable = trainable_snapshot(trainer.model)
    assert any("modules_to_save" in n for n in trainable)
    assert {trainer.model.get_parameter(n).dtype for n in trainable} == {torch.float32}
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    assert frozen == {base_dtype}
    trainer.train()
    assert sorted(changed(trainer.model, trainable)) == sorted(trainable)


# ---- an explicit dtype is the dtype of the frozen weights ---------------------------------------


@pytest.mark.parametrize(
    ("saved", "asked", "key"),
    [
        (torch.float32, torch.bfloat16, "dtype"),
        (torch.bfloat16, torch.float32, "dtype"),
        (torch.float32, torch.float16, "torch_dtype"),  # the older spelling in TRL recipes
    ],
)
def test_model_init_kwargs_dtype_is_honoured(tokenizer, tmp_path, saved, asked, key):
    path = save_tiny_model("llama", tokenizer, tmp_path / "model", dtype=saved)
    init = {key: str(asked).removeprefix("torch.")}
    trainer = SFTTrainer(
        model=str(path),
        args=quick_args(tmp_path / "run", learning_rate=LR, model_init_kwargs=init),
        train_dataset=ROWS,
        peft_config=lora(),
    )
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {asked}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert sorted(changed(trainer.model, before)) == sorted(before)


def test_yaml_model_dtype_is_honoured(tokenizer, tmp_path, monkeypatch):
    """``model.dtype`` in a run config reaches from_pretrained (sftrainer.train -> load_model)."""
    train_module = importlib.import_module("sftrainer.train")  # the module; sftrainer.train is train()
    path = save_tiny_model("llama", tokenizer, tmp_path / "model", dtype=torch.float32)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    built: list[SFTTrainer] = []

    class Recording(SFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(self)

    monkeypatch.setattr(train_module, "SFTTrainer", Recording)
    cfg = load_config(
        None,
        [
            f"model.name_or_path={path}",
            "model.dtype=bfloat16",
            f"data.train={data}",
            "lora.r=4",
            f"output_dir={tmp_path / 'out'}",
            "max_steps=1",
            "max_length=64",
            "report_to=none",
            "save_strategy=no",
            "disable_tqdm=true",
        ],
    )
    train_module.train(cfg)
    (trainer,) = built
    assert isinstance(trainer.model, PeftModel)
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}


# ---- autocast decisions, hardware monkeypatched ----------------------------------------------


@pytest.mark.parametrize(
    ("asked", "use_cpu", "accelerator", "bf16_ok", "expected"),
    [
        # Default (bf16 not asked): bf16 autocast where the accelerator runs it, whatever its kind.
        ({}, False, "cuda", True, MixedPrecision(False, True)),
        ({}, False, "mps", True, MixedPrecision(False, True)),
        ({}, False, "xpu", True, MixedPrecision(False, True)),
        ({}, False, "cuda", False, MixedPrecision(False, False)),  # e.g. a V100
        ({}, False, None, False, MixedPrecision(False, False)),
        ({}, True, "cuda", True, MixedPrecision(False, False)),  # use_cpu: no default autocast
        # Asked for and runnable: kept.
        ({"fp16": True}, False, "mps", True, MixedPrecision(True, False)),
        ({"bf16": True}, False, "xpu", True, MixedPrecision(False, True)),
        ({"bf16": True}, True, None, False, MixedPrecision(False, True)),  # bf16 autocast on the CPU
        # Asked for and not runnable here: dropped, training is fp32.
        ({"fp16": True}, False, None, False, MixedPrecision(False, False, "fp16")),
        ({"fp16": True}, True, "cuda", True, MixedPrecision(False, False, "fp16")),
        ({"bf16": True}, False, None, False, MixedPrecision(False, False, "bf16")),
    ],
)
def test_choose_mixed_precision(asked, use_cpu, accelerator, bf16_ok, expected):
    choice = choose_mixed_precision(
        asked.get("fp16", False), asked.get("bf16"), use_cpu, accelerator, bf16_ok
    )
    assert choice == expected


class FakeAccelerator:
    """``torch.accelerator`` reporting an Apple GPU, on a machine where CUDA is absent."""

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_accelerator() -> torch.device:
        return torch.device("mps")


def test_accelerator_is_found_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "accelerator", FakeAccelerator, raising=False)
    assert precision.accelerator_type() == "mps"
    assert precision.has_accelerator()


def test_apply_mixed_precision_defaults_bf16_on_a_non_cuda_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch, "accelerator", FakeAccelerator, raising=False)
    monkeypatch.setattr(precision, "is_torch_bf16_gpu_available", lambda: True)

    class Args:
        fp16, bf16, use_cpu = False, None, False

    args = Args()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.apply_mixed_precision(args)
    assert args.bf16 is True and args.fp16 is False


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_apply_mixed_precision_without_accelerator_warns_once(monkeypatch, flag):
    monkeypatch.setattr(precision, "accelerator_type", lambda: None)

    class Args:
        fp16, bf16, use_cpu, mixed_precision = False, None, False, flag

    args = Args()
    setattr(args, flag, True)
    with pytest.warns(UserWarning, match=f"{flag}=True needs a GPU or other accelerator") as caught:
        precision.apply_mixed_precision(args)
    assert len(caught) == 1 and "fp32" in str(caught[0].message)
    assert (args.fp16, args.bf16, args.mixed_precision) == (False, False, "no")
