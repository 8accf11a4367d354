"""The varlen FlashAttention path, checked on the CPU: with an attention implementation that takes no mask
(``flash_attention_2`` / ``3``, a ``kernels`` hub kernel: anything registered with FlashAttention's mask
function), packed and padding-free batches reach the model as one flat row in the form transformers
documents (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), and the packed-row isolation
probe runs on that form and refuses a kernel that ignores the boundaries.

FlashAttention itself needs CUDA, so the tests register a reference varlen attention of their own through
transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``: plain softmax attention computed
sequence by sequence from ``cu_seq_lens`` (or, if absent, from ``position_ids``), as FlashAttention's varlen
kernel does; its "leaky" twin attends across the whole flat row.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from sftrainer import SFTTrainer
from sftrainer.data.collate import PositionCollator
from sftrainer.errors import ContaminationError
from sftrainer.trainer_data import varlen_attention

SEEN: list[dict] = []  # what the reference kernel was called with


def packed_calls() -> list[dict]:
    """The kernel's calls on rows that hold more than one sequence (not the probe's row alone, nor the
    chunked loss's one-time check)."""
    return [c for c in SEEN if c["position_ids"] is not None and int((c["position_ids"][0] == 0).sum()) > 1]


def _attend(query, key, value, scaling):
    """Causal softmax attention of one sequence: query / key / value [H, n, D] (keys repeated to H heads)."""
    scores = (query @ key.transpose(-1, -2)) * scaling
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ value


def _varlen_reference(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, leaky=False, **kw
):
    """[B, H, T, D] query / key / value -> [B, T, H, D], each sequence on its own (``leaky``: the whole row)."""
    assert attention_mask is None, "a varlen kernel gets no mask"
    SEEN.append({k: kw.get(k) for k in ("cu_seq_lens_q", "max_length_q", "position_ids")})
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    assert query.shape[0] == 1, "varlen batches are one flat row"
    total = query.shape[2]
    if leaky:
        bounds = [0, total]
    elif kw.get("cu_seq_lens_q") is not None:
        bounds = kw["cu_seq_lens_q"].tolist()
    else:
        starts = torch.nonzero(kw["position_ids"][0] == 0).flatten().tolist()
        bounds = [*starts, total]
    out = torch.cat(
        [
            _attend(query[0, :, a:b], key[0, :, a:b], value[0, :, a:b], scaling)
            for a, b in itertools.pairwise(bounds)
        ],
        1,
    )
    return out.transpose(0, 1)[None].contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def reference_kernels():
    ALL_ATTENTION_FUNCTIONS.register("varlen_reference", _varlen_reference)
    ALL_ATTENTION_FUNCTIONS.register("varlen_leaky", lambda *a, **k: _varlen_reference(*a, leaky=True, **k))
    for name in ("varlen_reference", "varlen_leaky"):
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, flash_attention_mask)
    yield
    for name in ("varlen_reference", "varlen_leaky"):
        ALL_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)
        ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop(name, None)


rows = st.lists(
    st.lists(st.integers(3, 200), min_size=1, max_size=12).map(
        lambda ids: {"input_ids": ids, "labels": [t if t % 3 else -100 for t in ids]}
    ),
    min_size=1,
    max_size=6,
)


@given(features=rows)
@settings(max_examples=60, deadline=None)
def test_flat_batches_have_the_form_transformers_documents(features):
    ours = PositionCollator(0, flatten=True, flash_kwargs=True)(features)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert ours[key].dtype == value.dtype, key
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value and type(ours[key]) is type(value), key


def test_the_varlen_decision_follows_the_mask_interface(tiny_model_dir):
    for impl, varlen in [("varlen_reference", True), ("sdpa", False), ("eager", False)]:
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl)
        assert varlen_attention(model) is varlen, impl


def _model_inputs(trainer):
    seen = []
    trainer.model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(dict(kw)), with_kwargs=True)
    return seen


@pytest.mark.parametrize("packing", [True, False])
def test_the_trained_batch_is_one_flat_row_with_its_boundaries(tiny_model_dir, tmp_path, packing):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="varlen_reference")
    args = quick_args(
        tmp_path, max_steps=2, packing=packing, padding_free=not packing, per_device_train_batch_size=3
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ROWS * 3)
    seen = _model_inputs(trainer)
    SEEN.clear()
    trainer.train()
    batches = [kw for kw in seen if kw.get("labels") is not None or "cu_seq_lens_q" in kw]
    assert batches, "the model saw no training batch"
    for kw in batches:
        assert "attention_mask" not in kw or kw["attention_mask"] is None
        ids, positions = kw["input_ids"], kw["position_ids"]
        assert ids.shape[0] == 1 and positions.shape == ids.shape
        starts = torch.nonzero(positions[0] == 0).flatten()
        assert len(starts) > 1, "more than one sequence in the flat row"
        expected = torch.cat([starts, torch.tensor([ids.shape[1]])]).to(torch.int32)
        assert torch.equal(kw["cu_seq_lens_q"].cpu(), expected) and torch.equal(
            kw["cu_seq_lens_k"].cpu(), expected
        )
        assert kw["max_length_q"] == kw["max_length_k"] == int(expected.diff().max())
        # positions count up by one inside each sequence
        for a, b in itertools.pairwise(expected.tolist()):
            assert positions[0, a:b].tolist() == list(range(b - a))
    # the kernel read the collator's boundaries: none derived on the device
    assert packed_calls() and all(call["cu_seq_lens_q"] is not None for call in packed_calls())


def test_the_isolation_probe_runs_on_the_varlen_form(tiny_model_dir, tmp_path):
    """The probe lays out its rows as the trainer does (one flat row with cu_seq_lens): the reference
    kernel passes; a kernel that ignores the boundaries is refused before training."""
    good = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="varlen_reference")
    trainer = SFTTrainer(
        model=good, args=quick_args(tmp_path / "good", max_steps=1, packing=True), train_dataset=ROWS
    )
    SEEN.clear()
    trainer.check_packed_isolation()
    assert packed_calls() and all(call["cu_seq_lens_q"] is not None for call in packed_calls())

    leaky = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="varlen_leaky")
    trainer = SFTTrainer(
        model=leaky, args=quick_args(tmp_path / "leaky", max_steps=1, packing=True), train_dataset=ROWS
    )
    with pytest.raises(ContaminationError, match="attn_implementation='varlen_leaky'"):
        trainer.train()
