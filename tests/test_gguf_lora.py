"""GGUF LoRA export (sftrainer.gguf_lora, `sftrainer export --format gguf-lora`), with llama.cpp itself
(llama-cpp-python, the dev extra) as the oracle: the adapter GGUF applied by llama.cpp to the base GGUF
gives the adapter model's top-1 next token at every position of a few rows, and, after a short LoRA run
exported through the CLI, the same greedy chat completions as the merged GGUF (`--format gguf`).

The adapters target every linear layer, q_proj and k_proj included, so that the Q/K row permutation of
the `llama` architecture is exercised; the synthetic ones have B drawn large enough that the adapter
changes most top-1 tokens of the base (asserted), so a missing permutation or scale shows.
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (the dev extra): llama.cpp is the GGUF oracle"
)
pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf / dev extra)")

from sftrainer.errors import RunDirError  # noqa: E402
from sftrainer.export import export  # noqa: E402
from sftrainer.gguf_lora import lora_problems  # noqa: E402

ROWS = [
    "<|im_start|>user\nReverse the words: cat dog<|im_end|>\n<|im_start|>assistant\ndog cat<|im_end|>",
    "<|im_start|>user\nCount the words: sun sun sun<|im_end|>\n<|im_start|>assistant\n3<|im_end|>",
    "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nHi there, and then?\n\nok<|im_end|>",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the words: cat dog"}],
    [{"role": "user", "content": "Count the words: sun sun sun"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}],
]


@contextlib.contextmanager
def llama(path: Path, lora: Path | None = None, **kwargs):
    """A llama.cpp model of ``path``, with the GGUF LoRA ``lora`` applied (closed on exit)."""
    llm = llama_cpp.Llama(
        str(path), lora_path=str(lora) if lora else None, verbose=False, logits_all=True, n_ctx=256, **kwargs
    )
    try:
        yield llm
    finally:
        llm.close()


def llama_top1(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)]).argmax(-1)


def torch_top1(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].argmax(-1).numpy()


# ---- synthetic adapters on the built-in model --------------------------------------------------


def adapter_run(root: Path, base_dir: Path, b_std: float = 0.2, **lora) -> Path:
    """A run directory holding a LoRA adapter (every linear layer, r=4) on the built-in model, B drawn
    with std ``b_std`` (PEFT starts B at zero, which would make every export look right)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    settings = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", **lora}
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    run = root / "run"
    peft_model.save_pretrained(run)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(run)
    return run


@pytest.fixture(scope="module")
def synthetic(tiny_model_dir, tmp_path_factory):
    """(run, exported files, the adapter model in transformers) per adapter variant, built once."""
    from sftrainer.generate import load_for_inference

    @functools.cache
    def make(variant: str):
        lora = {"plain": {}, "rslora-patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 8},
                                                  "alpha_pattern": {"down_proj": 3}}}[variant]  # fmt: skip
        root = tmp_path_factory.mktemp(f"lora-{variant}")
        run = adapter_run(root, Path(tiny_model_dir), **lora)
        exported = export(run, root / "out", "gguf-lora")
        model, tok = load_for_inference(run, dtype="float32")
        return run, exported, model, tok

    return make


@pytest.mark.parametrize("variant", ["plain", "rslora-patterns"])
def test_adapter_on_base_matches_the_adapter_model_at_every_position(synthetic, variant):
    _, exported, model, tok = synthetic(variant)
    base_file, adapter_file, card = exported.files
    assert (base_file.name, adapter_file.name, card.name) == (
        "base-f16.gguf",
        "adapter-f16.gguf",
        "README.md",
    )
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text in ROWS]
    with llama(base_file, adapter_file) as with_lora, llama(base_file) as base_only:
        agree = [float((llama_top1(with_lora, ids) == torch_top1(model, ids)).mean()) for ids in rows]
        unchanged = [float((llama_top1(base_only, ids) == torch_top1(model, ids)).mean()) for ids in rows]
        assert agree == [1.0] * len(rows), agree
        # the adapter matters: without it, llama.cpp's base disagrees with the adapter model at most positions
        assert max(unchanged) < 0.5, unchanged


def test_adapter_gguf_metadata_and_layout(synthetic):
    import gguf

    _, exported, model, _ = synthetic("plain")
    reader = gguf.GGUFReader(exported.files[1])

    def text(key: str) -> str:
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.type") == "adapter" and text("adapter.type") == "lora"
    assert text("general.architecture") == "llama"
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == 8.0
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: (in, out)
    config = model.config
    assert shapes["blk.0.attn_q.weight.lora_a"] == (config.hidden_size, 4)
    assert shapes["blk.0.attn_k.weight.lora_b"] == (4, config.num_key_value_heads * config.head_dim)
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (config.intermediate_size, 4)
    assert len(shapes) == 2 * 7 * config.num_hidden_layers  # q k v o gate up down, A and B each
    card = exported.files[2].read_text()
    assert (
        "llama-cli -m base-f16.gguf --lora adapter-f16.gguf" in card
        and "--format gguf-lora --type f16" in card
    )


# ---- refusals, by name, before anything is written ------------------------------------------------


class _Config:
    model_type = "llama"
    tie_word_embeddings = True


PAIRS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]


@pytest.mark.parametrize(
    ("adapter", "names", "expected"),
    [
        ({"use_dora": True}, PAIRS, "DoRA (use_dora: true)"),
        ({"modules_to_save": ["lm_head"]}, PAIRS, "modules_to_save ['lm_head']"),
        ({"trainable_token_indices": [5]}, PAIRS, "trainable tokens"),
        ({"bias": "all"}, PAIRS, "trained biases"),
        ({"peft_type": "IA3"}, PAIRS, "the adapter is IA3, not LoRA"),
        (
            {},
            ["base_model.model.model.embed_tokens.lora_embedding_A"],
            "LoRA on the token embeddings (embed_tokens)",
        ),
        ({}, ["base_model.model.lm_head.lora_A.weight"], "LoRA on lm_head of a model with tied embeddings"),
        ({}, [*PAIRS, "base_model.model.model.norm.weight"], "weights other than LoRA pairs"),
    ],
)
def test_what_a_gguf_lora_cannot_hold_is_named(adapter, names, expected):
    problems = lora_problems({"peft_type": "LORA", **adapter}, names, _Config())
    assert len(problems) == 1 and expected in problems[0], problems


def test_unchecked_family_is_refused_by_name():
    config = type("Gemma", (), {"model_type": "gemma2"})()
    assert lora_problems({}, PAIRS, config) == [
        "model_type 'gemma2': GGUF LoRA export supports llama, mistral, qwen2, qwen3"
    ]


def test_dora_run_is_refused_before_writing(tiny_model_dir, tmp_path):
    run = adapter_run(tmp_path, Path(tiny_model_dir), use_dora=True)
    with pytest.raises(RunDirError, match=r"(?s)cannot be written as a GGUF LoRA.*DoRA.*use --format gguf"):
        export(run, tmp_path / "out", "gguf-lora")
    assert not (tmp_path / "out").exists()


def test_full_model_and_q8_0_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(RunDirError, match=r"no LoRA adapter for --format gguf-lora; use --format gguf"):
        export(tiny_model_dir, tmp_path / "out", "gguf-lora")
    with pytest.raises(RunDirError, match=r"--type must be one of \['f16', 'bf16'\], got 'q8_0'"):
        export(tiny_model_dir, tmp_path / "out", "gguf-lora", qtype="q8_0")


# ---- a trained run, exported through the CLI: adapter on base == merged ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "bf16"])
def test_run_adapter_on_base_equals_merged_gguf(lora_run, tmp_path, qtype):
    from sftrainer.cli import main
    from sftrainer.generate import load_for_inference

    targets = json.loads((lora_run / "adapter_config.json").read_text())["target_modules"]
    assert {"q_proj", "k_proj"} <= set(targets)  # all-linear: the Q/K permutation is exercised
    lora_out, merged_out = tmp_path / "lora", tmp_path / "merged"
    assert main(["export", str(lora_run), str(lora_out), "--format", "gguf-lora", "--type", qtype]) == 0
    assert main(["export", str(lora_run), str(merged_out), "--format", "gguf", "--type", qtype]) == 0
    model, tok = load_for_inference(lora_run, dtype="float32")
    rows = [tok(text, add_special_tokens=False)["input_ids"] for text in ROWS]
    base, adapter = lora_out / f"base-{qtype}.gguf", lora_out / f"adapter-{qtype}.gguf"
    with llama(base, adapter) as with_lora, llama(merged_out / f"model-{qtype}.gguf") as merged:
        ours = [llama_top1(with_lora, ids) for ids in rows]
        vs_merged = [float((o == llama_top1(merged, ids)).mean()) for o, ids in zip(ours, rows, strict=True)]
        vs_torch = [float((o == torch_top1(model, ids)).mean()) for o, ids in zip(ours, rows, strict=True)]
        print(qtype, "top-1 vs merged GGUF", vs_merged, "vs transformers", vs_torch, sum(map(len, rows)))
        assert vs_merged == [1.0] * len(rows) and vs_torch == [1.0] * len(rows)
        for messages in CONVERSATIONS:
            replies = []
            for llm in (with_lora, merged):
                llm.reset()
                reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=16)
                replies.append(reply["choices"][0]["message"]["content"])
            assert replies[0] == replies[1], replies
