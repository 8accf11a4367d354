"""FSDP / DeepSpeed settings and machine checks (``sftrainer.sharding``), on the CPU.

FSDP does not run on the CPU through transformers / accelerate (a CPU job is plain DDP: see the
module docstring), and DeepSpeed is not installed here: these tests check the settings, what the
configs resolve to, and the errors; tests/test_sharded_gpu.py runs the engines where GPUs are.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from sftrainer import sharding
from sftrainer.config import SFTConfig
from sftrainer.errors import ConfigError
from sftrainer.run_config import build_config


def args(**values):
    base = dict(
        fsdp=None,
        fsdp_config=None,
        deepspeed=None,
        use_cpu=False,
        activation_checkpointing=False,
        gradient_checkpointing=False,
    )
    return SimpleNamespace(**{**base, **values})


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}


# ---- settings ------------------------------------------------------------------------------


def test_fsdp_true_resolves_to_fsdp2_as_transformers_reads_it():
    cfg = build_config({"fsdp": True, "fsdp_config": {"reshard_after_forward": False}})
    assert cfg.train.fsdp is True
    plugin = cfg.train.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2  # transformers 5.x's default version
    assert plugin["reshard_after_forward"] is False
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"


def test_fsdp_config_from_a_json_file_and_with_accelerate_prefixes(tmp_path):
    path = tmp_path / "fsdp.json"
    path.write_text(json.dumps({"fsdp_version": 2, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}))
    cfg = build_config({"fsdp": True, "fsdp_config": str(path)})
    assert cfg.train.fsdp_plugin_args["state_dict_type"] == "SHARDED_STATE_DICT"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fsdp_config": {"version": 2}}, "fsdp_config: is read only with fsdp: true; add fsdp: true"),
        (
            {"fsdp": True, "fsdp_config": {"reshard_after_foward": True}},
            "fsdp_config.reshard_after_foward: not an FSDP setting transformers reads "
            "(did you mean 'reshard_after_forward'?)",
        ),
        (
            {"fsdp": True, "fsdp_config": {"state_dict_type": "LOCAL_STATE_DICT"}},
            "fsdp_config.state_dict_type: must be one of ('FULL_STATE_DICT', 'SHARDED_STATE_DICT')",
        ),
        ({"fsdp": True, "fsdp_config": {"version": 3}}, "fsdp_config.version: must be 2 (FSDP2) or 1"),
        ({"fsdp": True, "fsdp_config": "missing.json"}, "fsdp_config: no such file: missing.json"),
        (
            {
                "fsdp": True,
                "fsdp_config": {"activation_checkpointing": True},
                "activation_checkpointing": True,
            },
            "fsdp_config.activation_checkpointing: set it or activation_checkpointing",
        ),
        ({"fsdp": True, "deepspeed": ZERO3}, "fsdp / deepspeed: choose one sharding engine"),
        (
            {"deepspeed": {"zero_optimization": {"stage": 3}}},
            "deepspeed.zero_optimization.stage3_gather_16bit_weights_on_model_save: must be true under ZeRO-3",
        ),
        ({"deepspeed": {"zero_optimization": {"stage": 4}}}, "deepspeed.zero_optimization.stage: must be 0"),
        ({"deepspeed": "missing.json"}, "deepspeed: no such file: missing.json"),
    ],
)
def test_bad_sharding_settings_name_the_key(values, message):
    with pytest.raises(ConfigError) as err:
        build_config(values)
    assert message in str(err.value)


def test_a_bad_deepspeed_json_file_names_the_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2},}')  # a trailing comma: not JSON
    assert sharding.settings_problems(args(deepspeed=str(path)))[-1].startswith(
        f"deepspeed: {path} is not valid JSON"
    )
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object, got list"):
        sharding.read_deepspeed_config(str(path))


def test_deepspeed_not_installed_is_one_clear_problem_not_a_traceback(monkeypatch):
    monkeypatch.setattr(sharding, "deepspeed_available", lambda: False)
    with pytest.raises(ConfigError) as err:
        SFTConfig(output_dir="out", deepspeed=ZERO3)
    assert str(err.value).splitlines()[1:] == [
        f"  deepspeed: DeepSpeed is not installed: {sharding.INSTALL_DEEPSPEED}"
    ]


def test_zero3_gather_key_is_accepted_under_either_name():
    for key in sharding.ZERO3_GATHER_KEYS:
        assert sharding.deepspeed_config_problems({"zero_optimization": {"stage": 3, key: True}}) == []
    assert sharding.deepspeed_config_problems({"zero_optimization": {"stage": 2}}) == []
    assert sharding.zero_stage(args(deepspeed=ZERO3)) == 3 and sharding.zero_stage(args()) is None


@pytest.mark.parametrize(
    ("storage", "dtype", "engine", "refused"),
    [
        (None, "bfloat16", {"fsdp": True}, True),  # bitsandbytes' default storage, uint8
        ("bfloat16", "float32", {"fsdp": True}, True),  # storage and model dtype differ
        ("bfloat16", "bfloat16", {"fsdp": True}, False),
        ("torch.bfloat16", "bfloat16", {"fsdp": True}, False),
        (None, "bfloat16", {"deepspeed": ZERO3}, True),
        (None, "bfloat16", {"deepspeed": {"zero_optimization": {"stage": 2}}}, False),  # not partitioned
        (None, "bfloat16", {}, False),  # DDP
    ],
)
def test_a_4bit_base_under_fsdp_or_zero3_must_be_stored_in_the_model_dtype(storage, dtype, engine, refused):
    problems = sharding.quantized_problems(args(**engine), dtype, storage, four_bit=True)
    assert bool(problems) == refused
    if refused:
        assert problems[0].startswith("model.quantization_config.bnb_4bit_quant_storage: ")
        assert "bnb_4bit_quant_storage: bfloat16" in problems[0]
    assert sharding.quantized_problems(args(**engine), dtype, storage, four_bit=False) == []


def test_qlora_under_fsdp_is_checked_where_the_yaml_is_read():
    pytest.importorskip("bitsandbytes")
    base = {"fsdp": True, "lora": {"r": 4}}
    with pytest.raises(ConfigError, match="bnb_4bit_quant_storage: FSDP shards a 4-bit base only"):
        build_config({**base, "model": {"load_in_4bit": True}})
    mapping = {"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}
    cfg = build_config({**base, "model": {"dtype": "bfloat16", "quantization_config": mapping}})
    assert str(cfg.model.bnb_config().bnb_4bit_quant_storage) == "torch.bfloat16"


# ---- the machine ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "accelerator", "launched", "expected"),
    [
        ({}, None, False, None),  # no engine: nothing to check
        (
            {"fsdp": True},
            None,
            True,
            "fsdp: FSDP shards the training across GPUs, and this machine has no GPU",
        ),
        ({"fsdp": True, "use_cpu": True}, "cuda", True, "and use_cpu: true is set"),
        ({"deepspeed": ZERO3}, None, True, "deepspeed: DeepSpeed shards the training across GPUs"),
        ({"fsdp": True}, "cuda", False, "this one was started alone; run `sftrainer train CONFIG --nproc N`"),
        ({"deepspeed": ZERO3}, "cuda", False, None),  # DeepSpeed runs in one process too
        ({"fsdp": True}, "cuda", True, None),
    ],
)
def test_machine_problems(values, accelerator, launched, expected):
    problems = sharding.machine_problems(args(**values), accelerator, launched)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0]


def test_fsdp_on_the_cpu_is_refused_with_what_to_do_instead():
    message = sharding.machine_problems(args(fsdp=True, use_cpu=True), None, True)[0]
    assert "accelerate would run it as plain DDP and drop the FSDP settings" in message
    assert "remove fsdp and fsdp_config" in message and "--nproc N with use_cpu=true" in message


def test_the_trainer_refuses_fsdp_on_this_cpu_machine(tiny_model_dir):
    from sftrainer import precision
    from sftrainer.trainer import SFTTrainer

    if precision.has_accelerator():
        pytest.skip("this machine has an accelerator")
    config = SFTConfig(output_dir="out", fsdp=True, use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="fsdp: FSDP shards the training across GPUs"):
        SFTTrainer(model=str(tiny_model_dir), args=config, train_dataset=[{"text": "a b c"}])


# ---- saving --------------------------------------------------------------------------------


def plugin_trainer(state_dict_type: str | None) -> SimpleNamespace:
    if state_dict_type is None:
        return SimpleNamespace(is_fsdp_enabled=False)
    plugin = SimpleNamespace(state_dict_type=f"StateDictType.{state_dict_type}")
    return SimpleNamespace(
        is_fsdp_enabled=True, accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin))
    )


def test_only_a_sharded_fsdp_save_needs_the_full_weights_gathered():
    assert sharding.gathers_nothing_on_save(plugin_trainer("SHARDED_STATE_DICT"))
    assert not sharding.gathers_nothing_on_save(plugin_trainer("FULL_STATE_DICT"))
    assert not sharding.gathers_nothing_on_save(plugin_trainer(None))


def test_only_a_model_zero3_partitioned_is_left_to_deepspeed(tiny_model):
    assert not sharding.is_partitioned(tiny_model)
    # DeepSpeed's zero.Init gives every parameter its partition as `ds_tensor` (and an empty placeholder)
    next(tiny_model.parameters()).ds_tensor = None
    assert sharding.is_partitioned(tiny_model)
