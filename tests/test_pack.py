"""Packing and padding-free batching: the packer's invariants and exact equivalence with unpacked rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import AutoModelForCausalLM

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.collate import DataCollatorForLanguageModeling, PaddedCollator, PositionCollator
from sftrainer.data.pack import StreamPacker, best_fit_decreasing, pack_dataset
from sftrainer.errors import ContaminationError
from sftrainer.isolation import check_row_isolation


def _rows(lengths: list[int], seed: int = 0, vocab: int = 300) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(5, vocab, size=n).tolist()
        cut = max(1, n // 2)  # untrained "prompt", trained "response"
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * cut + ids[cut:]})
    return rows


# ---- best-fit-decreasing ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfd_respects_capacity_and_places_every_item_once(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=2000)
    bins = best_fit_decreasing(lengths, 256)
    assert bins.shape == lengths.shape  # every item placed exactly once
    loads = np.bincount(bins, weights=lengths)
    assert loads.max() <= 256
    # Best fit decreasing is within 11/9 OPT + 1; the volume bound is a lower bound on OPT.
    assert len(loads) <= 11 / 9 * np.ceil(lengths.sum() / 256) + 1


def test_bfd_fills_tightest_bin():
    # 6 and 4 fill one bin exactly; best fit must put 4 next to 6, not next to 5.
    bins = best_fit_decreasing(np.array([6, 5, 4, 5]), 10)
    assert bins[0] == bins[2]
    assert bins[1] == bins[3]


def test_bfd_rejects_items_that_cannot_fit():
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        best_fit_decreasing(np.array([3, 9]), 8)


# ---- pack_dataset -------------------------------------------------------------------------


def _segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """Split a packed row back into (input_ids, labels) of its rows, using position_ids."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return [(row["input_ids"][a:b], row["labels"][a:b]) for a, b in itertools.pairwise(starts)]


def test_pack_dataset_keeps_every_row_with_its_labels_and_positions():
    rows = _rows([5, 3, 7, 2, 9, 4, 8, 1, 6])
    packed, stats = pack_dataset(Dataset.from_list(rows), max_length=10)
    out = packed.to_list()
    assert all(len(r["input_ids"]) <= 10 for r in out)
    assert (
        stats.rows == 9
        and stats.sequences == len(out)
        and stats.tokens == sum(len(r["input_ids"]) for r in rows)
    )
    found = sorted((tuple(ids), tuple(labels)) for r in out for ids, labels in _segments(r))
    # Each original row appears exactly once, with its own labels except the first token (never trained).
    want = sorted((tuple(r["input_ids"]), tuple([IGNORE_INDEX, *r["labels"][1:]])) for r in rows)
    assert found == want
    for r in out:
        for ids, _ in _segments(r):
            assert len(ids) >= 1
        assert r["position_ids"] == [p for ids, _ in _segments(r) for p in range(len(ids))]
        assert r["seq_lengths"] == [len(ids) for ids, _ in _segments(r)]  # TRL's column, same pieces


def test_pack_dataset_on_a_filtered_view():
    ds = Dataset.from_list(_rows([4, 5, 6, 7])).filter(lambda r: len(r["input_ids"]) != 5)
    packed, stats = pack_dataset(ds, max_length=8)
    assert stats.rows == 3
    assert sorted(len(s[0]) for r in packed.to_list() for s in _segments(r)) == [4, 6, 7]


def test_pack_dataset_refuses_overlong_rows_unless_split():
    ds = Dataset.from_list(_rows([3, 12]))
    with pytest.raises(ValueError, match="bfd_split"):
        pack_dataset(ds, max_length=8)
    packed, stats = pack_dataset(ds, max_length=8, strategy="bfd_split")
    assert stats.split_rows == 1
    pieces = sorted(len(s[0]) for r in packed.to_list() for s in _segments(r))
    assert pieces == [3, 4, 8]  # 12 tokens -> 8 + 4
    assert sum(pieces) == 15


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_seq_lengths_are_the_pieces_of_each_packed_row(strategy):
    """TRL's column: the lengths of the pieces packed into a row, in order, as position_ids tell them."""
    rows = _rows([5, 3, 7, 2, 9, 4, 8, 1, 6, 14] if strategy != "bfd" else [5, 3, 7, 2, 9, 4, 8, 1, 6])
    packed, stats = pack_dataset(Dataset.from_list(rows), 10, strategy)
    for r in packed.to_list():
        assert r["seq_lengths"] == [len(ids) for ids, _ in _segments(r)]
        assert sum(r["seq_lengths"]) == len(r["input_ids"]) <= 10
    assert sum(len(r) for r in packed["seq_lengths"]) >= stats.rows


def test_trl_collator_position_ids_from_seq_lengths():
    positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths([[3, 2], [4], []])
    assert [p.tolist() for p in positions] == [[0, 1, 2, 0, 1], [0, 1, 2, 3], []]


# ---- streams -------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_stream_packer_gives_the_rows_of_pack_dataset(strategy):
    """One window holding every row packs exactly as the map-style packer does."""
    rows = _rows([5, 3, 7, 2, 9, 4, 8, 1, 6, 14] if strategy != "bfd" else [5, 3, 7, 2, 9, 4, 8, 1, 6])
    table, _ = pack_dataset(Dataset.from_list(rows), 10, strategy)
    batch = {"input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]}
    assert StreamPacker(10, strategy)(batch) == table.to_dict()


def test_a_packed_stream_keeps_every_row_and_reads_one_window_at_a_time():
    rows = _rows([int(n) for n in np.random.default_rng(3).integers(1, 30, size=500)])
    read = []

    def source():
        for k, row in enumerate(rows):
            read.append(k)
            yield row

    stream = IterableDataset.from_generator(source).map(StreamPacker(32, "bfd"), batched=True, batch_size=100)
    packed = iter(stream)
    first = next(packed)
    assert len(read) <= 100  # one window read, not the data set: memory does not grow with the data
    out = [first, *packed]
    assert all(len(r["input_ids"]) <= 32 for r in out)
    found = sorted((tuple(ids), tuple(labels)) for r in out for ids, labels in _segments(r))
    assert found == sorted((tuple(r["input_ids"]), tuple([IGNORE_INDEX, *r["labels"][1:]])) for r in rows)


# ---- equivalence with unpacked rows -------------------------------------------------------


def _per_token_losses(model, batch) -> torch.Tensor:
    """Cross-entropy of every trained token, in order of appearance."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses[labels.reshape(-1) != IGNORE_INDEX]


def _model(tiny_model_dir, impl):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation=impl, dtype=torch.float32
    )
    model.config.use_cache = False  # what SFTTrainer sets for packed batches
    model.eval()
    return model


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("flatten", [True, False])
def test_packed_losses_and_gradients_equal_row_by_row(tiny_model_dir, impl, flatten):
    model = _model(tiny_model_dir, impl)
    rows = _rows([9, 14, 5, 11, 7, 20], vocab=model.config.vocab_size)
    packed, _ = pack_dataset(Dataset.from_list(rows), max_length=32)
    packed_rows = packed.to_list()
    collate = PositionCollator(pad_token_id=0, flatten=flatten)

    # Losses: per trained token, packed vs each row alone (matched by content: packing reorders rows).
    together = _per_token_losses(model, collate(packed_rows))
    alone = {}
    for row in rows:
        single = PaddedCollator(pad_token_id=0)([row])
        alone[tuple(row["input_ids"])] = _per_token_losses(model, single)
    expected = torch.cat([alone[tuple(ids)] for r in packed_rows for ids, _ in _segments(r)])
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-5)

    # Gradients of one training step (token-mean loss over the whole batch).
    n_tokens = expected.numel()
    model.zero_grad()
    (_per_token_losses(model, collate(packed_rows)).sum() / n_tokens).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for row in rows:
        (_per_token_losses(model, PaddedCollator(pad_token_id=0)([row])).sum() / n_tokens).backward()
    for got, want in zip(packed_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_free_losses_equal_padded(tiny_model_dir, impl):
    model = _model(tiny_model_dir, impl)
    rows = _rows([9, 14, 5, 11], vocab=model.config.vocab_size)
    padded = _per_token_losses(model, PaddedCollator(pad_token_id=0)(rows))
    flat = _per_token_losses(model, PositionCollator(pad_token_id=0, flatten=True)(rows))
    torch.testing.assert_close(flat, padded, atol=1e-5, rtol=1e-5)


def test_position_collator_shapes_and_first_token_label():
    rows = _rows([3, 5])
    flat = PositionCollator(pad_token_id=0, flatten=True)(rows)
    assert flat["input_ids"].shape == (1, 8)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert flat["labels"][0, 0] == IGNORE_INDEX and flat["labels"][0, 3] == IGNORE_INDEX
    assert "attention_mask" not in flat  # its absence is what makes transformers read position_ids
    rows_layout = PositionCollator(pad_token_id=0, flatten=False, pad_to_multiple_of=4)(rows)
    assert rows_layout["input_ids"].shape == (2, 8)
    # Padding has position 0 (each pad token a sequence of its own, TRL's layout), label IGNORE_INDEX.
    assert rows_layout["position_ids"][0].tolist() == [0, 1, 2, 0, 0, 0, 0, 0]
    assert (rows_layout["labels"][0, 3:] == IGNORE_INDEX).all()


class _LeakyCollator(PositionCollator):
    """Sends plain 0..T-1 positions: a packed row then looks like one long sequence."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
        return batch


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("flatten", [True, False])
def test_isolation_check_passes_and_refuses_a_leaking_setup(tiny_model_dir, impl, flatten):
    model = _model(tiny_model_dir, impl)
    check_row_isolation(model, PositionCollator(pad_token_id=0, flatten=flatten))
    # Positions that run on across rows make any backend mix them: no backend advice.
    with pytest.raises(ContaminationError, match="rows of a packed batch see each other") as refused:
        check_row_isolation(model, _LeakyCollator(pad_token_id=0, flatten=flatten))
    assert "Use attn_implementation" not in str(refused.value)


def test_use_cache_would_leak_which_is_why_training_turns_it_off(tiny_model_dir):
    """transformers 5.x builds the packed-sequence mask only without a KV cache (see compute_loss)."""
    model = _model(tiny_model_dir, "sdpa")
    rows = _rows([6, 5], vocab=model.config.vocab_size)
    batch = PositionCollator(pad_token_id=0, flatten=True)(rows)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        cached = model(**inputs, use_cache=True).logits[0, 6:]
        uncached = model(**inputs, use_cache=False).logits[0, 6:]
        alone = model(input_ids=torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits[0]
    torch.testing.assert_close(uncached, alone, atol=1e-5, rtol=1e-5)
    assert (cached - alone).abs().max() > 1e-2
