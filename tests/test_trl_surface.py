"""The TRL 1.16 surface, field by field: a TRL script runs and trains the same thing.

Where sftrainer deliberately differs, the test says so (and the README's "Switching from TRL").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM, TrainingArguments

from sftrainer import ConfigError, DataError, SFTConfig, SFTTrainer
from sftrainer.config import to_sft_config
from sftrainer.constants import IGNORE_INDEX
from sftrainer.data.pack import pack_dataset

NO_GPU = not torch.cuda.is_available()
# Warnings TRL's own config and trainer raise on a CPU with transformers 5.24 (not sftrainer's).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true:UserWarning"),
    pytest.mark.filterwarnings("ignore:The `'keep_end'` truncation mode is deprecated:FutureWarning"),
]
NEW_FIELDS = (
    "dataset_kwargs",
    "truncation_mode",
    "shuffle_dataset",
    "loss_type",
    "activation_offloading",
    "router_aux_loss_coef",
    "trust_remote_code",
    "packing_strategy",
    "pad_to_multiple_of",
)
# TRL defaults sftrainer deliberately does not share (README: "Switching from TRL").
DIFFERENT_DEFAULTS = {
    "dataset_text_field",  # TRL "text"; here None: the format is detected from the columns
    "pad_to_multiple_of",  # TRL "auto" (128 on AWS Neuron only, else None); here None
    "gradient_checkpointing",  # TRL True; here transformers' False
    "bf16",  # TRL True (fails on CPU without use_cpu); here on where the GPU supports it
}
PAIRS = [{"prompt": f"Question {i}: what is {i}+{i}?", "completion": f" {2 * i}"} for i in range(8)]


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def test_every_trl_sft_field_exists_with_trl_default_and_help():
    ours, theirs = _fields(SFTConfig), _fields(trl.SFTConfig)
    trl_only = set(theirs) - set(ours)
    # Owned elsewhere (tokenizer preparation), arriving with that work.
    assert trl_only <= {"eos_token", "pad_token", "chat_template_path"}, trl_only
    for name in NEW_FIELDS:
        assert ours[name].metadata.get("help"), name
        if name not in DIFFERENT_DEFAULTS:
            assert ours[name].default == theirs[name].default, name
    assert SFTConfig(output_dir="x", report_to="none", pad_to_multiple_of="auto").pad_to_multiple_of is None


def test_bad_trl_values_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as err:
        SFTConfig(
            output_dir=str(tmp_path),
            truncation_mode="keep_middle",
            loss_type="dtf",
            dataset_kwargs={"skip_prepare": True},
            router_aux_loss_coef=-1.0,
            packing_strategy="wraped",
        )
    message = str(err.value)
    for expected in (
        "truncation_mode",
        "loss_type: must be one of",
        "did you mean 'dft'",
        "dataset_kwargs: unknown key 'skip_prepare' (did you mean 'skip_prepare_dataset'?)",
        "router_aux_loss_coef",
        "did you mean 'wrapped'",
    ):
        assert expected in message, message


def test_chunked_nll_is_trls_alias_of_nll(tmp_path):
    with pytest.warns(FutureWarning, match=r"`loss_type='chunked_nll'` is deprecated.*use loss_type='nll'"):
        args = SFTConfig(output_dir=str(tmp_path), report_to="none", loss_type="chunked_nll")
    assert args.loss_type == "nll"


@pytest.mark.skipif(not NO_GPU, reason="on a GPU, activation offloading is supported")
def test_activation_offloading_without_a_gpu_is_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ConfigError, match=r"activation_offloading: .*needs a CUDA GPU, but no CUDA GPU is visible"
    ):
        SFTConfig(output_dir=str(tmp_path), activation_offloading=True)


def test_liger_kernel_is_refused_with_the_reason(tmp_path):
    """Liger patches the model's forward and loss, which sftrainer's chunked loss and isolation checks
    replace: refused when the config is built, before any model loads (TRL applies it)."""
    with pytest.raises(ConfigError, match=r"use_liger_kernel: not supported: .*set use_liger_kernel=false"):
        SFTConfig(output_dir=str(tmp_path), use_liger_kernel=True)
    assert not SFTConfig(output_dir=str(tmp_path)).use_liger_kernel  # the default still builds


def test_dft_with_label_smoothing_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="label_smoothing_factor"):
        SFTConfig(output_dir=str(tmp_path), loss_type="dft", label_smoothing_factor=0.1)


# ---- a trl.SFTConfig passed as args -------------------------------------------------------------


def _trl_config(tmp_path, **kw) -> trl.SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "trl"),
        bf16=False,  # TRL's default bf16=True refuses to run on a CPU without use_cpu
        gradient_checkpointing=False,
        max_length=64,
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return trl.SFTConfig(**{**values, **kw})


def test_trl_config_keeps_its_sft_fields(tmp_path):
    theirs = _trl_config(
        tmp_path,
        max_length=77,
        packing=True,
        packing_strategy="wrapped",
        loss_type="dft",
        shuffle_dataset=True,
        completion_only_loss=False,
        eval_packing=False,
        dataset_num_proc=1,
        pad_to_multiple_of=8,
        dataset_kwargs={"skip_prepare_dataset": True},
        router_aux_loss_coef=0.5,
        model_init_kwargs={"attn_implementation": "eager"},
        gradient_checkpointing=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing TRL-specific is set that sftrainer lacks: no warning
        ours = to_sft_config(theirs)
    sft_fields = set(_fields(trl.SFTConfig)) - set(_fields(TrainingArguments))
    shared = (sft_fields & set(_fields(SFTConfig))) - {"dataset_text_field"}
    assert len(shared) >= 17
    for name in [*shared, "gradient_checkpointing", "learning_rate", "max_steps"]:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.dataset_text_field is None  # TRL's default "text": the format is detected here
    assert ours.train_on == "all"  # completion_only_loss=False


def test_trl_fields_sftrainer_lacks_are_named_in_one_warning(tmp_path):
    @dataclasses.dataclass
    class MySFTConfig(trl.SFTConfig):
        curriculum: str = "none"

    theirs = MySFTConfig(**dataclasses.asdict(_trl_config(tmp_path)) | {"curriculum": "easy-first"})
    with pytest.warns(UserWarning, match="sets curriculum, which sftrainer does not support") as caught:
        to_sft_config(theirs)
    assert len([w for w in caught if "does not support" in str(w.message)]) == 1


def _run(trainer) -> list[dict]:
    trainer.train()
    return [
        {k: h[k] for k in ("loss", "entropy", "mean_token_accuracy", "num_tokens")}
        for h in trainer.state.log_history
        if "loss" in h
    ]


@pytest.mark.parametrize(
    ("kw", "data"),
    [
        ({}, PAIRS),
        ({"loss_type": "dft"}, PAIRS),
        ({"max_length": 12, "truncation_mode": "keep_end"}, PAIRS),
        (  # pre-tokenized rows with TRL's completion_mask
            {"completion_only_loss": True},
            [
                {
                    "input_ids": [5, 6, 7, 8, 9, 10, 11][: 4 + i % 3],
                    "completion_mask": [0, 0, 1, 1, 1, 1, 1][: 4 + i % 3],
                }
                for i in range(8)
            ],
        ),
    ],
    ids=["nll", "dft", "keep_end", "completion_mask"],
)
def test_a_trl_script_trains_the_same_thing(tiny_model_dir, tokenizer, tmp_path, kw, data):
    """Same trl.SFTConfig, model and data through TRL's SFTTrainer and ours: same rows, losses, metrics."""
    args = _trl_config(tmp_path, **kw)
    runs = []
    for trainer_cls in (trl.SFTTrainer, SFTTrainer):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end
            trainer = trainer_cls(
                model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer
            )
        rows = [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]
        runs.append((rows, _run(trainer)))
    (trl_rows, trl_logs), (our_rows, our_logs) = runs
    assert our_rows == trl_rows
    assert len(our_logs) == len(trl_logs) == 2
    for got, want in zip(our_logs, trl_logs):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


# ---- data fields ---------------------------------------------------------------------------------


def _trainer(tiny_model_dir, tmp_path, rows, **kw) -> SFTTrainer:
    return SFTTrainer(model=str(tiny_model_dir), args=quick_args(tmp_path, **kw), train_dataset=rows)


def test_truncation_mode_keep_end_keeps_the_response(tiny_model_dir, tokenizer, tmp_path):
    rows = [{"prompt": "word " * 40, "completion": " last"}]
    start = _trainer(
        tiny_model_dir, tmp_path, rows * 2 + [{"prompt": "Hi", "completion": " there"}], max_length=16
    )
    assert start.data_stats["train data"].dropped_empty == 2  # the response was cut away: dropped, counted
    end = _trainer(tiny_model_dir, tmp_path, rows, max_length=16, truncation_mode="keep_end")
    row = end.train_dataset[0]
    assert len(row["input_ids"]) == 16 and end.data_stats["train data"].truncated == 1
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == " last" + tokenizer.eos_token


def test_shuffle_dataset_shuffles_with_the_seed(tiny_model_dir, tmp_path):
    plain = _trainer(tiny_model_dir, tmp_path, PAIRS).train_dataset["input_ids"]
    shuffled = _trainer(tiny_model_dir, tmp_path, PAIRS, shuffle_dataset=True).train_dataset["input_ids"]
    again = _trainer(tiny_model_dir, tmp_path, PAIRS, shuffle_dataset=True).train_dataset["input_ids"]
    assert shuffled != plain and sorted(shuffled) == sorted(plain)
    assert shuffled == again


def test_skip_prepare_dataset_uses_the_rows_as_given(tiny_model_dir, tmp_path):
    rows = [
        {"input_ids": list(range(5, 5 + n)), "labels": [IGNORE_INDEX, *range(6, 5 + n)]}
        for n in (70, 9, 12, 4)
    ]
    trainer = _trainer(tiny_model_dir, tmp_path, rows, dataset_kwargs={"skip_prepare_dataset": True})
    assert [len(r) for r in trainer.train_dataset["input_ids"]] == [70, 9, 12, 4]  # not cut to max_length=64
    assert trainer.data_stats == {}
    assert math.isfinite(trainer.train().training_loss)


def test_skip_prepare_dataset_refuses_masks_without_labels(tiny_model_dir, tmp_path):
    rows = [{"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]}]
    with pytest.raises(DataError, match=r"completion_mask.*no 'labels'"):
        _trainer(tiny_model_dir, tmp_path, rows, dataset_kwargs={"skip_prepare_dataset": True})


def test_trust_remote_code_reaches_the_model_and_tokenizer_loaders(tiny_model_dir, tmp_path, monkeypatch):
    import sftrainer.setup as trainer_module

    seen = {}
    real_model, real_tokenizer = trainer_module.load_model, trainer_module.load_tokenizer
    monkeypatch.setattr(
        trainer_module, "load_model", lambda p, **kw: seen.setdefault("model", kw) and real_model(p, **kw)
    )
    monkeypatch.setattr(
        trainer_module,
        "load_tokenizer",
        lambda p, trc=False, revision=None: seen.setdefault("tokenizer", trc) and real_tokenizer(p),
    )
    _trainer(tiny_model_dir, tmp_path, PAIRS, trust_remote_code=True)
    assert seen == {"model": {"trust_remote_code": True}, "tokenizer": True}


# ---- packing_strategy="wrapped" and pad_to_multiple_of --------------------------------------------


def test_wrapped_packing_cuts_the_stream_and_keeps_rows_apart():
    lengths = [5, 9, 3, 12, 7]
    rows, start = [], 10
    for n in lengths:
        ids = list(range(start, start + n))
        rows.append({"input_ids": ids, "labels": ids})
        start += n
    packed, stats = pack_dataset(Dataset.from_list(rows), 8, "wrapped")
    stream = [t for r in rows for t in r["input_ids"]]
    assert [t for r in packed for t in r["input_ids"]] == stream  # in order, nothing lost
    assert [len(r["input_ids"]) for r in packed] == [8, 8, 8, 8, 4]
    assert stats.split_rows == 4 and stats.sequences == 5
    # Positions restart at every row start and every cut, and those first tokens are never trained.
    starts = {0, 5, 14, 17, 29} | {8, 16, 24, 32}
    flat_pos = [p for r in packed for p in r["position_ids"]]
    flat_labels = [x for r in packed for x in r["labels"]]
    assert [i for i, p in enumerate(flat_pos) if p == 0] == sorted(starts)
    assert all((flat_labels[i] == IGNORE_INDEX) == (i in starts) for i in range(len(stream)))


def test_wrapped_packing_trains_isolated_rows(tiny_model_dir, tmp_path):
    rows = [{"text": f"Document {i}: " + "lorem ipsum " * (i % 7 + 1)} for i in range(12)]
    trainer = _trainer(
        tiny_model_dir, tmp_path, rows, packing=True, packing_strategy="wrapped", max_length=32
    )
    lengths = [len(r) for r in trainer.train_dataset["input_ids"]]
    assert set(lengths[:-1]) == {32}  # every sequence but the last is full
    assert "position_ids" in trainer.train_dataset.column_names
    assert math.isfinite(trainer.train().training_loss)


@pytest.mark.parametrize("kw", [{}, {"padding_free": True}, {"packing": True}])
def test_pad_to_multiple_of_applies_to_every_batch_layout(tiny_model_dir, tmp_path, kw):
    trainer = _trainer(tiny_model_dir, tmp_path, ROWS, pad_to_multiple_of=16, **kw)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    assert batch["input_ids"].shape[1] % 16 == 0
    for key in ("labels", "position_ids", "attention_mask"):
        if key in batch:
            assert batch[key].shape == batch["input_ids"].shape


# ---- pre-tokenized rows with TRL's loss masks ----------------------------------------------------


def test_tokenized_rows_with_loss_masks_train_only_the_masked_tokens(tiny_model_dir, tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 0, 0, 1, 1]},
        {"input_ids": [5, 6, 7, 8, 9], "assistant_masks": [0, 1, 1, 0, 1]},
        {
            "input_ids": [5, 6, 7, 8, 9],
            "completion_mask": [0, 1, 1, 1, 1],
            "assistant_masks": [1, 1, 0, 0, 1],
        },
        {"input_ids": [5, 6, 7, 8, 9], "completion_mask": [0, 0, 0, 0, 1]},  # trained token cut by max_length
    ]
    trainer = _trainer(tiny_model_dir, tmp_path, rows, max_length=4)
    X = IGNORE_INDEX
    assert trainer.train_dataset["labels"] == [[X, X, X, 8], [X, 6, 7, X], [X, 6, X, X]]
    stats = trainer.data_stats["train data"]
    assert (stats.rows, stats.kept, stats.dropped_empty, stats.truncated) == (4, 3, 1, 3)
    everything = _trainer(tiny_model_dir, tmp_path, rows, max_length=4, train_on="all")
    assert everything.train_dataset["labels"][0] == [5, 6, 7, 8]  # train_on=all: the masks do not apply


# ---- the public collator ------------------------------------------------------------------------

COLLATOR_ROWS = [{"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]}, {"input_ids": [4, 5]}]


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"pad_to_multiple_of": 8},
        {"return_position_ids": True},
        {"padding_free": True},
        {"padding_free": True, "pad_to_multiple_of": 8},
    ],
)
def test_public_collator_matches_trls(kw):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

    from sftrainer import DataCollatorForLanguageModeling

    ours = DataCollatorForLanguageModeling(0, **kw)(COLLATOR_ROWS)
    theirs = TRLCollator(0, **kw)(COLLATOR_ROWS)
    # TRL also returns FlashAttention's varlen arguments; transformers derives them from position_ids.
    assert set(theirs) - set(ours) <= {
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "seq_idx",
    }
    assert set(ours) <= set(theirs)
    for key in ("input_ids", "labels", "attention_mask"):
        if key in ours:
            assert torch.equal(ours[key], theirs[key]), key
    if "position_ids" in ours:  # padding gets positions of its own block here, 0s in TRL
        assert torch.equal(ours["position_ids"][:, :5], theirs["position_ids"][:, :5])


def test_public_collator_reads_trl_packing_and_loss_masks():
    from sftrainer import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    packed = collator([{"input_ids": [7, 8, 9, 10, 11], "seq_lengths": [3, 2]}])
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert "attention_mask" not in packed  # rows of a packed sequence are kept apart by positions
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 8, 9, IGNORE_INDEX, 11]]
    masked = collator(
        [{"input_ids": [5, 6, 7, 8], "completion_mask": [0, 0, 1, 1], "assistant_masks": [1, 1, 1, 0]}]
    )
    assert masked["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX]]
    everything = DataCollatorForLanguageModeling(0, completion_only_loss=False)(
        [{"input_ids": [5, 6], "completion_mask": [0, 1]}]
    )
    assert everything["labels"].tolist() == [[5, 6]]
    with pytest.raises(ValueError, match="only 'pt'"):
        DataCollatorForLanguageModeling(0, return_tensors="np")


def test_differences_from_trl_are_said_once_in_the_log(tiny_model_dir, tmp_path, caplog):
    chat = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}] * 4
    with caplog.at_level(logging.INFO, logger="sftrainer.pipeline"):
        trainer = SFTTrainer(
            model=str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=chat, eval_dataset=chat
        )
        trainer.evaluate(chat)
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Differs from TRL")]
    assert len(notes) == 1 and "assistant turns only" in notes[0]


def test_trainer_takes_trls_arguments_in_trls_order():
    import inspect

    ours = list(inspect.signature(SFTTrainer.__init__).parameters)
    theirs = list(inspect.signature(trl.SFTTrainer.__init__).parameters)
    assert ours[: len(theirs)] == theirs


def test_quantization_config_reaches_the_loader_or_is_said_to_be_ignored(tiny_model, tmp_path, monkeypatch):
    import sftrainer.setup as trainer_module

    marker = object()
    monkeypatch.setattr(trainer_module, "load_model", lambda path, **kw: (_ for _ in ()).throw(KeyError(kw)))
    with pytest.raises(KeyError) as err:
        SFTTrainer(
            model="some/model", args=quick_args(tmp_path), train_dataset=PAIRS, quantization_config=marker
        )
    assert err.value.args[0]["quantization_config"] is marker
    with pytest.warns(UserWarning, match="quantization_config is ignored"):
        SFTTrainer(
            model=tiny_model, args=quick_args(tmp_path), train_dataset=PAIRS, quantization_config=marker
        )


def test_top_level_trust_remote_code_in_yaml_reaches_the_model_section():
    from sftrainer import load_config

    assert load_config(overrides=["trust_remote_code=true"]).model.trust_remote_code is True
    assert load_config().model.trust_remote_code is False
