"""Packed rows must be independent: a row's logits may not change when the row packed before it does.

Tiny random-init models of every family: plain attention ones pass on eager and SDPA, in both batch
layouts; families whose layers carry state along the sequence (LFM2's short convolutions, Mamba,
hybrids, gated DeltaNet) are refused with the layer named. Each test prints what the probe measured
(``pytest -s``): the numbers behind the tolerances in ``sftrainer/isolation.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import (
    ARCHITECTURES,
    MORE_STATEFUL_ARCHITECTURES,
    ROWS,
    STATEFUL_ARCHITECTURES,
    UNRECOGNISED_STATEFUL_ARCHITECTURES,
    quick_args,
    tiny_causal_lm,
)

from sftrainer import SFTTrainer
from sftrainer.data.collate import DataCollatorForLanguageModeling, PositionCollator
from sftrainer.errors import ContaminationError
from sftrainer.isolation import (
    FP32_INDEPENDENCE,
    REDUCED_TOLERANCE,
    check_row_isolation,
    probe_rows,
    stateful_layers,
)

pytestmark = pytest.mark.slow

LAYOUTS = {"flat": True, "rows": False}  # padding-free / FlashAttention: one flat row; else padded rows

# The layer each family's refusal names (what transformers 5.25 calls it).
STATEFUL_LAYERS = {
    "lfm2": "Lfm2ShortConv ('conv')",
    "mamba": "MambaMixer ('linear_attention')",
    "mamba2": "Mamba2Mixer ('linear_attention')",
    "falcon_h1": "FalconH1Mixer ('hybrid')",
    "nemotron_h": "NemotronHMamba2Mixer ('linear_attention')",
    "granitemoehybrid": "GraniteMoeHybridMambaLayer ('linear_attention')",
    "qwen3_next": "Qwen3NextGatedDeltaNet ('linear_attention')",
    "qwen3_5": "Qwen3_5GatedDeltaNet ('linear_attention')",
}


MORE_STATEFUL_LAYERS = {
    "lfm2_moe": "Lfm2MoeShortConv ('conv')",
    "jamba": "JambaMambaMixer (a causal convolution)",
    "bamba": "BambaMixer ('linear_attention')",
    "falcon_mamba": "FalconMambaMixer ('linear_attention')",
    "recurrent_gemma": "RecurrentGemmaRecurrentBlock (a causal convolution)",
    "kimi_linear": "KimiLinearDeltaAttention ('linear_attention')",
    "minimax": "MiniMaxLightningAttention ('linear_attention')",
    "olmo_hybrid": "OlmoHybridGatedDeltaNet ('linear_attention')",
}


def _report(label: str, probe) -> None:
    print(f"{label}: neighbour {probe.neighbour:.2g}, alone {probe.alone:.2g}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_plain_attention_families_pass_in_float32_and_bfloat16(arch, impl, layout):
    model = tiny_causal_lm(arch, attn_implementation=impl)
    collator = PositionCollator(pad_token_id=0, flatten=LAYOUTS[layout])
    assert stateful_layers(model) == []
    check_row_isolation(model, collator)
    probe = probe_rows(model, collator)
    _report(f"{arch} {impl} {layout} float32", probe)
    assert probe.neighbour <= FP32_INDEPENDENCE / 10  # measured: at most 1.2e-7
    with torch.autocast("cpu", torch.bfloat16):
        check_row_isolation(model, collator, torch.bfloat16)
        bf16 = probe_rows(model, collator, precision="bfloat16")
    _report(f"{arch} {impl} {layout} bfloat16", bf16)
    assert bf16.neighbour <= REDUCED_TOLERANCE / 4  # measured: at most 2e-3


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", list(STATEFUL_ARCHITECTURES))
def test_families_with_stateful_layers_are_refused_naming_the_layer(arch, layout):
    model = tiny_causal_lm(arch)
    collator = PositionCollator(pad_token_id=0, flatten=LAYOUTS[layout])
    assert stateful_layers(model) == [STATEFUL_LAYERS[arch]]
    _report(f"{arch} {layout} float32", probe_rows(model, collator))
    with torch.autocast("cpu", torch.bfloat16):
        _report(f"{arch} {layout} bfloat16", probe_rows(model, collator, precision="bfloat16"))
    for autocast in (None, torch.bfloat16):
        autocasting = torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None)
        with autocasting, pytest.raises(ContaminationError) as refused:
            check_row_isolation(model, collator, autocast)
        message = str(refused.value)
        assert STATEFUL_LAYERS[arch] in message and "carry state along the sequence" in message
        assert "Set packing=False and padding_free=False" in message
        assert "attn_implementation" not in message  # the attention backend is not what leaks


@pytest.mark.parametrize("arch", list(MORE_STATEFUL_ARCHITECTURES))
def test_more_families_with_stateful_layers_are_recognised_and_refused(arch):
    model = tiny_causal_lm(arch)
    assert stateful_layers(model) == [MORE_STATEFUL_LAYERS[arch]]
    with pytest.raises(ContaminationError, match="carry state along the sequence"):
        check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=True))


@pytest.mark.parametrize("arch", list(UNRECOGNISED_STATEFUL_ARCHITECTURES))
def test_recurrent_families_not_recognised_are_refused_by_the_probe(arch):
    model = tiny_causal_lm(arch)
    assert stateful_layers(model) == []
    with pytest.raises(ContaminationError, match="rows of a packed batch see each other") as refused:
        check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=True))
    assert "Use attn_implementation" not in str(refused.value)


def test_the_old_check_accepted_lfm2_which_leaks_below_its_tolerance():
    """The old check compared a packed row with the row alone within 1e-3 x scale: LFM2's convolution
    moves the row by less, so it passed. Independence catches it, 40x over float32 noise."""
    model = tiny_causal_lm("lfm2")
    probe = probe_rows(model, PositionCollator(pad_token_id=0, flatten=False))
    _report("lfm2 rows float32", probe)
    assert probe.alone < 1e-3  # what the old check accepted
    assert probe.neighbour > 20 * FP32_INDEPENDENCE
    with pytest.raises(ContaminationError, match=r"Lfm2ShortConv"):
        check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=False))


def test_bfloat16_hides_lfm2s_leak_so_it_is_checked_in_float32():
    model = tiny_causal_lm("lfm2")
    collator = PositionCollator(pad_token_id=0, flatten=True)
    with torch.autocast("cpu", torch.bfloat16):
        assert probe_rows(model, collator, precision="bfloat16").isolated()  # within bfloat16 rounding
        with pytest.raises(ContaminationError, match=r"Lfm2ShortConv.*in float32"):
            check_row_isolation(model, collator, torch.bfloat16)
    # bfloat16 weights cannot run in float32: not proven, so refused all the same.
    with pytest.raises(ContaminationError, match=r"Lfm2ShortConv.*cannot be checked in float32"):
        check_row_isolation(model.to(torch.bfloat16), collator)


def test_weights_in_bfloat16_or_quantized_are_judged_at_their_compute_precision(caplog):
    """No autocast, but bf16 weights (a LoRA base) compute in bf16, and quantized ones in their
    quantizer's dtype: float32's tolerance would refuse their rounding as a leak."""
    model = tiny_causal_lm("llama").to(torch.bfloat16)
    with caplog.at_level("INFO", logger="sftrainer.isolation"):
        check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=True))
    assert "in bfloat16" in caplog.text
    quantized = tiny_causal_lm("llama")
    quantized.packed_weight = torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
    with caplog.at_level("INFO", logger="sftrainer.isolation"):
        check_row_isolation(quantized, PositionCollator(pad_token_id=0, flatten=True))
    assert "in the quantized weights' compute dtype" in caplog.text


class _Leaky(torch.nn.Module):
    """Wraps a module and adds 1e-4 of its output at the previous position: a tiny leak across rows."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)  # [B, T, H]
        return out + 1e-4 * torch.nn.functional.pad(out, (0, 0, 1, 0))[:, :-1]


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_a_tiny_leak_outside_attention_is_refused_without_backend_advice(impl):
    model = tiny_causal_lm("llama", attn_implementation=impl)
    model.model.norm = _Leaky(model.model.norm)  # the final norm: logits move by about 1e-4
    collator = PositionCollator(pad_token_id=0, flatten=True)
    probe = probe_rows(model, collator)
    _report(f"llama + 1e-4 leak {impl}", probe)
    assert probe.alone < 1e-3  # the old check passed it
    with pytest.raises(
        ContaminationError, match=r"rows of a packed batch see each other in LlamaForCausalLM"
    ) as e:
        check_row_isolation(model, collator)
    assert "Use attn_implementation" not in str(e.value)


def test_an_attention_backend_that_leaks_gets_backend_advice():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def leaky(module, query, key, value, attention_mask, **kwargs):  # ignores the packed-rows mask
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)

    AttentionInterface.register("leaky_isolation_test", leaky)
    model = tiny_causal_lm("llama", attn_implementation="leaky_isolation_test")
    with pytest.raises(
        ContaminationError,
        match=r"attn_implementation='leaky_isolation_test'.*with 'eager' they do not.*Use attn_implementation",
    ):
        check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=True))
    assert model.config._attn_implementation == "leaky_isolation_test"  # restored after trying eager


class _ShortConvLM(torch.nn.Module):
    """Embedding -> causal depthwise convolution over positions -> head, like LFM2's short convolution.
    With ``reset`` the taps that would reach across a ``position_ids`` restart are zeroed (what a kernel
    given ``seq_idx`` does), so packed rows stay independent."""

    def __init__(self, reset: bool, vocab: int = 64, hidden: int = 16, width: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(_attn_implementation=None)
        self.reset = reset
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.conv = torch.nn.Conv1d(hidden, hidden, width, groups=hidden)
        self.head = torch.nn.Linear(hidden, vocab)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def forward(self, input_ids, position_ids=None, **kwargs):
        x = self.embed(input_ids)  # [B, T, H]
        T = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(T).expand_as(input_ids)
        segment = (position_ids == 0).cumsum(-1)  # [B, T]: which packed row each position is in
        out = torch.zeros_like(x)
        for k in range(self.conv.kernel_size[0]):  # tap k reads position t - k
            shifted = torch.nn.functional.pad(x, (0, 0, k, 0))[:, :T]
            keep = torch.ones_like(segment, dtype=torch.bool)
            if self.reset:
                keep = torch.nn.functional.pad(segment, (k, 0), value=-1)[:, :T] == segment
            out = out + shifted * keep[..., None] * self.conv.weight[:, 0, -1 - k]
        return SimpleNamespace(logits=self.head(out + self.conv.bias))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stateful_layers_that_keep_rows_apart_are_not_refused(layout):
    """The probe decides, not the list: a convolution that resets where a row starts trains packed,
    in float32 and under bfloat16 autocast (then checked in float32 too); one that does not is refused."""
    collator = PositionCollator(pad_token_id=0, flatten=LAYOUTS[layout])
    isolated, leaky = _ShortConvLM(reset=True), _ShortConvLM(reset=False)
    assert stateful_layers(isolated) == ["_ShortConvLM (a causal convolution)"]
    check_row_isolation(isolated, collator)
    with torch.autocast("cpu", torch.bfloat16):
        check_row_isolation(isolated, collator, torch.bfloat16)
    with pytest.raises(ContaminationError, match=r"_ShortConvLM \(a causal convolution\)"):
        check_row_isolation(leaky, collator)


def test_trls_collator_is_probed_in_its_own_layout():
    model = tiny_causal_lm("qwen3_5")
    for padding_free in (True, False):
        with pytest.raises(ContaminationError, match="Qwen3_5GatedDeltaNet"):
            check_row_isolation(
                model, DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
            )


# ---- SFTTrainer: refused when built, before any data is prepared ----------------------------------


@pytest.mark.parametrize("setting", [{"packing": True}, {"padding_free": True}, {"eval_packing": True}])
def test_trainer_refuses_packing_lfm2_before_preparing_data(tokenizer, tmp_path, monkeypatch, setting):
    model = tiny_causal_lm("lfm2", vocab_size=len(tokenizer))

    def prepare(*args, **kwargs):
        raise AssertionError("the data was prepared before the model was checked")

    monkeypatch.setattr("sftrainer.pipeline.DataPipeline.__call__", prepare)
    args = quick_args(tmp_path, **setting)
    with pytest.raises(ContaminationError, match=r"Lfm2ShortConv.*Set packing=False and padding_free=False"):
        SFTTrainer(model=model, args=args, train_dataset=ROWS, processing_class=tokenizer)


def test_trainer_trains_lfm2_without_packing(tokenizer, tmp_path):
    model = tiny_causal_lm("lfm2", vocab_size=len(tokenizer))
    trainer = SFTTrainer(
        model=model, args=quick_args(tmp_path, max_steps=1), train_dataset=ROWS, processing_class=tokenizer
    )
    trainer.train()


def test_the_vision_check_refuses_stateful_text_layers_too():
    """LFM2-VL: its language model's short convolutions leak across packed rows with images as without."""
    import transformers

    from sftrainer.vision.probe import check_isolation

    if not hasattr(transformers, "Lfm2VlConfig"):
        pytest.skip(f"transformers {transformers.__version__} has no Lfm2VlConfig")
    text = transformers.Lfm2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"], pad_token_id=0,
    )  # fmt: skip
    vision = transformers.Siglip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4
    )
    config = transformers.Lfm2VlConfig(text_config=text, vision_config=vision, projector_hidden_size=32)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    collator = SimpleNamespace(pad_token_id=0, flatten=True)  # only its layout is read before refusing
    with pytest.raises(ContaminationError, match=r"Lfm2VlForConditionalGeneration .*Lfm2ShortConv"):
        check_isolation(model, collator)
