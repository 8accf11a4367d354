"""Quantized bases (sftrainer/quant.py): QLoRA trains only the adapter of a 4-bit / 8-bit base that
stays quantized and unchanged; the adapter saves, reloads and merges into the full-precision base;
the YAML keys and their errors. bitsandbytes runs on the CPU (0.45+), so all of this runs here."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel
from tiny_models import ROWS, changed, quick_args, save_tiny_model, trainable_snapshot
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from sftrainer import SFTTrainer, quant
from sftrainer.errors import ConfigError
from sftrainer.run_config import load_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("bitsandbytes") is None,
        reason="bitsandbytes (the quant extra) is not installed: pip install 'sftrainer[quant]'",
    ),
]

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
QUANTIZED = ("Params4bit", "Int8Params")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import AutoTokenizer

    from sftrainer import builtin

    tokenizer = AutoTokenizer.from_pretrained(builtin.model_dir())
    return save_tiny_model("llama", tokenizer, tmp_path_factory.mktemp("llama") / "model")


def base_weights(model) -> dict[str, torch.Tensor]:
    """Every frozen weight of the base, quantized ones as stored (packed 4-bit / int8 data)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def logits(model, ids: list[int]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.float()


IDS = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48]


# ---- QLoRA trains the adapter only -------------------------------------------------------------


@pytest.mark.parametrize(
    "bnb",
    [
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
        {"load_in_8bit": True},
        {"load_in_4bit": True, "dora": True},
    ],
    ids=["nf4-double", "fp4", "int8", "nf4-dora"],
)
def test_qlora_trains_only_the_adapter_and_the_base_stays_quantized(llama_dir, tmp_path, bnb):
    bnb = dict(bnb)
    dora = bnb.pop("dora", False)
    trainer = SFTTrainer(
        model=str(llama_dir),
        args=quick_args(tmp_path, max_steps=3),
        train_dataset=ROWS,
        quantization_config=bnb,  # a mapping works as well as a BitsAndBytesConfig
        peft_config=LoraConfig(**LORA, use_dora=dora),
    )
    model = trainer.model
    kind = "Params4bit" if bnb.get("load_in_4bit") else "Int8Params"
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert type(q_proj.weight).__name__ == kind
    frozen, adapters = base_weights(model), trainable_snapshot(model)
    assert adapters and all("lora_" in n for n in adapters)
    assert any("lora_magnitude_vector" in n for n in adapters) == dora
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    trainer.train()
    assert sorted(changed(model, adapters)) == sorted(adapters)  # every adapter tensor moved
    now = dict(model.named_parameters())
    quantized = [n for n in frozen if type(now[n]).__name__ in QUANTIZED]
    assert len(quantized) == 2 * 7  # 7 linear layers in each of the 2 blocks
    assert all(type(now[n]).__name__ == kind for n in quantized)  # still packed, never dequantized
    assert not [n for n, old in frozen.items() if not torch.equal(now[n].detach(), old)]  # unchanged


def test_4bit_layers_keep_a_layout_they_can_be_trained_through(llama_dir, tmp_path, recwarn):
    """On AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight for inference at an eval-mode forward,
    a layout with no backward. The flag it reads is set here as on such a CPU; where this CPU has
    AVX512-BF16, the model is also evaluated first, so its weights arrive repacked."""
    from bitsandbytes.functional import has_avx512bf16

    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    stored = [m.weight.data.clone() for m in layers]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    if has_avx512bf16():
        logits(model, [1, 5, 7])
        assert all(m.weight.quant_state.packing_format_for_cpu for m in layers)
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, max_steps=2),
        train_dataset=ROWS,
        peft_config=LoraConfig(**LORA),
    )
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert all(torch.equal(m.weight.data, w) for m, w in zip(layers, stored))  # the standard layout again
    trainer.train()  # its start runs the model in eval mode (the loss check): nothing is repacked
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not [w for w in recwarn if "autograd kernel was not registered" in str(w.message)]


def test_an_already_quantized_model_object_trains(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, max_steps=2),
        train_dataset=ROWS,
        peft_config=LoraConfig(**LORA),
    )
    before = trainable_snapshot(trainer.model)
    trainer.train()
    assert changed(trainer.model, before)


def test_gradient_checkpointing_gives_the_same_adapter_as_without(llama_dir, tmp_path):
    """Non-reentrant checkpointing on a 4-bit base: the frozen embeddings give no input that requires
    grad, and the adapters must still get their gradients (lora.apply makes the input require grad)."""
    weights = []
    for checkpointing in (False, True):
        trainer = SFTTrainer(
            model=str(llama_dir),
            args=quick_args(tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing),
            train_dataset=ROWS,
            quantization_config={"load_in_4bit": True},
            peft_config=LoraConfig(**LORA),
        )
        trainer.train()
        weights.append(trainable_snapshot(trainer.model))
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], atol=1e-6, rtol=1e-5)


def test_a_half_precision_base_keeps_its_dtype(tmp_path):
    """QLoRA changes no dtype the user chose beyond what it needs: the non-quantized weights of a
    bf16 checkpoint (embeddings, norms, lm_head) stay bf16; only the adapters are float32."""
    from transformers import AutoTokenizer

    from sftrainer import builtin

    tokenizer = AutoTokenizer.from_pretrained(builtin.model_dir())
    path = save_tiny_model("llama", tokenizer, tmp_path / "bf16", dtype=torch.bfloat16)
    trainer = SFTTrainer(
        model=str(path),
        args=quick_args(tmp_path / "out", max_steps=1),
        train_dataset=ROWS,
        quantization_config={"load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"},
        peft_config=LoraConfig(**LORA),
    )
    base = trainer.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    trainer.train()  # bf16 activations through 4-bit layers and float32 adapters, without autocast


# ---- save, reload, merge ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qlora_run(llama_dir, tmp_path_factory):
    """A QLoRA run through the YAML path (train(cfg)): 4-bit NF4 base, LoRA adapter saved."""
    from sftrainer.train import train

    root = tmp_path_factory.mktemp("qlora")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    cfg = load_config(
        None,
        defaults={
            "model": {"name_or_path": str(llama_dir), "load_in_4bit": True},
            "data": {"train": str(data)},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "output_dir": str(root / "run"),
            "max_steps": 8,
            "per_device_train_batch_size": 4,
            "learning_rate": 1e-2,
            "max_length": 64,
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "exact_match_samples": 0,
        },
    )
    metrics = train(cfg)
    assert metrics["train_loss"] > 0
    return root / "run"


def load_4bit(path):
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant.model_bnb_config(load_in_4bit=True)
    )


def test_yaml_qlora_run_saves_an_adapter(qlora_run, llama_dir):
    adapter = json.loads((qlora_run / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(llama_dir)
    from safetensors.torch import load_file

    weights = load_file(qlora_run / "adapter_model.safetensors")
    assert weights and all("lora_" in n for n in weights)
    assert all(w.dtype == torch.float32 for w in weights.values())
    saved = (qlora_run / "sftrainer_config.yaml").read_text()
    assert "load_in_4bit: true" in saved


def test_adapter_reloads_on_a_4bit_base(qlora_run, llama_dir):
    base_logits = logits(load_4bit(llama_dir), IDS)
    reloaded = logits(PeftModel.from_pretrained(load_4bit(llama_dir), qlora_run), IDS)
    assert not torch.allclose(reloaded, base_logits, atol=1e-2), "the adapter changed nothing"
    again = logits(PeftModel.from_pretrained(load_4bit(llama_dir), qlora_run), IDS)
    torch.testing.assert_close(again, reloaded, atol=0, rtol=0)  # deterministic reload


def test_merge_goes_into_the_full_precision_base(qlora_run, llama_dir, tmp_path, caplog):
    """export.merge (what `sftrainer merge` runs): a plain transformers model whose logits equal the
    adapter on the float32 base (tight), and are close to the QLoRA model's (loose: the QLoRA model
    computes with 4-bit weights, the merged one with the original float32 weights)."""
    from sftrainer.export import merge

    with caplog.at_level(logging.INFO, logger="sftrainer.export"):
        out = merge(qlora_run, tmp_path / "merged")
    assert "trained on a quantized base (QLoRA)" in caplog.text
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not any(type(p).__name__ in QUANTIZED for p in merged.parameters())
    full_base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    adapter_fp32 = logits(PeftModel.from_pretrained(full_base, qlora_run), IDS)
    merged_logits = logits(merged, IDS)
    torch.testing.assert_close(merged_logits, adapter_fp32, atol=1e-5, rtol=1e-5)
    qlora = logits(PeftModel.from_pretrained(load_4bit(llama_dir), qlora_run), IDS)
    gap = (merged_logits - qlora).abs().max().item()
    # The error of quantizing the base itself, with no adapter: the merged model may differ from the
    # QLoRA model by about that much, and no more.
    base_fp32 = logits(AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32), IDS)
    quantization_error = (base_fp32 - logits(load_4bit(llama_dir), IDS)).abs().max().item()
    trained = (adapter_fp32 - base_fp32).abs().max().item()
    # Measured (max |difference| of logits): merged vs float32 base + adapter 1.8e-7; merged vs QLoRA
    # 0.13; float32 base vs 4-bit base 0.058; the adapter's own effect 0.71. The QLoRA gap is about
    # twice the base's quantization error because the adapter was trained against the 4-bit weights
    # (it partly fits their rounding), so the bounds are of that order, not a float tolerance.
    assert gap < 4 * quantization_error
    assert gap < 0.3 * trained


# ---- the YAML keys ---------------------------------------------------------------------------


def test_yaml_keys_make_a_bitsandbytes_config():
    cfg = load_config(None, defaults={"model": {"load_in_4bit": True}, "lora": {}})
    bnb = cfg.model.bnb_config()
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4" and bnb.bnb_4bit_use_double_quant
    from sftrainer.precision import accelerator_supports_bf16

    expected = torch.bfloat16 if accelerator_supports_bf16() else torch.float32
    assert bnb.bnb_4bit_compute_dtype == expected
    cfg = load_config(
        None,
        defaults={"lora": {}},
        overrides=[
            "model.load_in_4bit=true",
            "model.bnb_4bit_quant_type=fp4",
            "model.bnb_4bit_use_double_quant=false",
            "model.bnb_4bit_compute_dtype=bfloat16",
        ],
    )
    bnb = cfg.model.bnb_config()
    assert (bnb.bnb_4bit_quant_type, bnb.bnb_4bit_use_double_quant) == ("fp4", False)
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    cfg = load_config(None, defaults={"model": {"load_in_8bit": True}, "lora": {}})
    assert cfg.model.bnb_config().load_in_8bit
    mapping = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": ["lm_head"]}
    cfg = load_config(None, defaults={"model": {"quantization_config": mapping}, "lora": {}})
    assert cfg.model.bnb_config().llm_int8_skip_modules == ["lm_head"]
    assert load_config(None, defaults={}).model.bnb_config() is None


@pytest.mark.parametrize(
    "model, lora, expected",
    [
        ({"load_in_4bit": True}, None, "model.load_in_4bit: a quantized base cannot be fine-tuned in full"),
        ({"load_in_8bit": True}, None, "model.load_in_8bit: a quantized base cannot be fine-tuned in full"),
        ({"load_in_4bit": True, "load_in_8bit": True}, {}, "set model.load_in_4bit or model.load_in_8bit, not both"),
        ({"bnb_4bit_quant_type": "nf4"}, {}, "model.bnb_4bit_quant_type: applies to a 4-bit base only"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, {}, "must be one of ('nf4', 'fp4'), got 'nf5'"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "bf16"}, {}, "model.bnb_4bit_compute_dtype: must be"),
        (
            {"quantization_config": {"load_in_4bit": True, "bnb_4bit_quant": "nf4"}},
            {},
            "model.quantization_config.bnb_4bit_quant: not a BitsAndBytesConfig setting (did you mean",
        ),
        ({"quantization_config": {"bnb_4bit_quant_type": "nf4"}}, {}, "set load_in_4bit: true or load_in_8bit"),
        (
            {"quantization_config": {"load_in_8bit": True}, "load_in_4bit": True},
            {},
            "set model.quantization_config or model.load_in_4bit, not both",
        ),
    ],
)  # fmt: skip
def test_impossible_settings_are_refused_before_any_work(model, lora, expected):
    raw = {"model": model} if lora is None else {"model": model, "lora": lora}
    with pytest.raises(ConfigError) as err:
        load_config(None, defaults=raw)
    assert expected in str(err.value)


def test_yaml_model_init_kwargs_reach_the_loader():
    """TRL's spelling at the top of a YAML file: used for what the model: section leaves unset,
    refused where both set the same thing, and a quantized base without lora: is refused as well."""
    init = {"quantization_config": {"load_in_4bit": True}, "attn_implementation": "eager"}
    cfg = load_config(None, defaults={"model_init_kwargs": init, "lora": {}})
    kwargs = cfg.model.load_kwargs(cfg.train.model_init_kwargs)
    assert (
        kwargs["quantization_config"] == {"load_in_4bit": True} and kwargs["attn_implementation"] == "eager"
    )
    assert kwargs["dtype"] == "auto" and kwargs["trust_remote_code"] is False
    with pytest.raises(ConfigError) as err:
        load_config(None, defaults={"model_init_kwargs": init, "model": {"load_in_8bit": True}, "lora": {}})
    assert "model_init_kwargs.quantization_config: the model: section sets it too" in str(err.value)
    with pytest.raises(
        ConfigError, match=r"model_init_kwargs\.quantization_config: a quantized base cannot be"
    ):
        load_config(None, defaults={"model_init_kwargs": init})
    cfg = load_config(None, defaults={"model_init_kwargs": {"torch_dtype": "bfloat16"}})
    assert cfg.model.load_kwargs(cfg.train.model_init_kwargs)["dtype"] == "bfloat16"


def test_full_fine_tuning_a_quantized_model_is_refused(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"full fine-tuning is impossible\. Train a LoRA adapter"):
        SFTTrainer(
            model=str(llama_dir),
            args=quick_args(tmp_path, model_init_kwargs={"quantization_config": {"load_in_4bit": True}}),
            train_dataset=ROWS,
        )


def test_older_load_in_4bit_keyword_is_understood(llama_dir, tmp_path):
    """TRL recipes pass load_in_4bit=True in model_init_kwargs; transformers 5 no longer takes it."""
    trainer = SFTTrainer(
        model=str(llama_dir),
        args=quick_args(tmp_path, model_init_kwargs={"load_in_4bit": True}),
        train_dataset=ROWS,
        peft_config=LoraConfig(**LORA),
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit


def test_without_bitsandbytes_the_error_names_the_extra(monkeypatch, llama_dir, tmp_path):
    monkeypatch.setattr(quant, "bitsandbytes_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'sftrainer\[quant\]'"
    ):
        load_config(None, defaults={"model": {"load_in_4bit": True}, "lora": {}})
    with pytest.raises(ConfigError, match=r"pip install 'sftrainer\[quant\]'"):
        SFTTrainer(
            model=str(llama_dir),
            args=quick_args(tmp_path),
            train_dataset=ROWS,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True),
            peft_config=LoraConfig(**LORA),
        )
    assert load_config(None, defaults={}).model.bnb_config() is None  # an unquantized run needs nothing


def test_absent_extra_prints_nothing_and_is_named(tmp_path):
    """With bitsandbytes not importable (as when the extra is not installed): importing sftrainer and
    the trainer prints nothing, and asking for 4-bit names the extra."""
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"  # find_spec -> None, import -> ImportError
        "import sftrainer, sftrainer.trainer, sftrainer.train\n"
        "from sftrainer.run_config import load_config\n"
        "try:\n"
        "    load_config(None, defaults={'model': {'load_in_4bit': True}, 'lora': {}})\n"
        "except sftrainer.ConfigError as err:\n"
        "    open(sys.argv[1], 'w').write(str(err))\n"
    )
    out = tmp_path / "error.txt"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert "model.load_in_4bit: a 4-bit or 8-bit model needs bitsandbytes" in out.read_text()
    assert "pip install 'sftrainer[quant]'" in out.read_text()


def test_8bit_cast_notice_is_said_once(llama_dir, tmp_path, caplog):
    """bitsandbytes logs a WARNING on every 8-bit matmul of float32 inputs; it is said once."""
    trainer = SFTTrainer(
        model=str(llama_dir),
        args=quick_args(tmp_path, max_steps=1),
        train_dataset=ROWS,
        quantization_config={"load_in_8bit": True},
        peft_config=LoraConfig(**LORA),
    )
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert caplog.text.count("MatMul8bitLt: inputs will be cast") <= 1


def test_qlora_resumes_from_a_checkpoint(llama_dir, tmp_path):
    """A checkpoint of a QLoRA run holds the adapter and optimizer; resuming it ends where an
    uninterrupted run ends."""

    def run(out, max_steps, resume=None):
        trainer = SFTTrainer(
            model=str(llama_dir),
            # constant: a run stopped at 2 of 4 steps must not decay its rate over 2 steps
            args=quick_args(
                out, max_steps=max_steps, save_strategy="steps", save_steps=2, lr_scheduler_type="constant"
            ),
            train_dataset=ROWS * 2,
            quantization_config={"load_in_4bit": True},
            peft_config=LoraConfig(**LORA),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer_weights(trainer)

    def trainer_weights(trainer):
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "stopped", 2)
    assert (tmp_path / "stopped" / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = run(tmp_path / "stopped", 4, resume=True)
    assert resumed.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-6, rtol=1e-5)
