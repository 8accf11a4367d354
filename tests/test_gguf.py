"""GGUF export (sftrainer.gguf_export, sftrainer.gguf_vocab, `sftrainer export --format gguf`), with
llama.cpp itself (llama-cpp-python, the dev extra) as the oracle:

- the built-in model: llama.cpp's top-1 next token equals transformers' at every position of a few rows
  (f16, bf16), and within a stated rate for q8_0; after a short LoRA run exported through the CLI,
  llama.cpp's greedy chat completion equals `sftrainer generate`;
- the same template, by tokens: the prompt llama-cpp-python builds for a chat request from the GGUF's
  own metadata tokenizes to the ids training gave it;
- released tokenizers (tests/data/tokenizers) on a tiny random Llama: llama.cpp's tokenization of
  generated text equals transformers'.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed (the dev extra): llama.cpp is the GGUF oracle"
)
pytest.importorskip("gguf", reason="the gguf package is not installed (the gguf / dev extra)")
from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: E402

from sftrainer.errors import ConfigError  # noqa: E402
from sftrainer.gguf_export import write_gguf  # noqa: E402
from sftrainer.gguf_vocab import pre_tokenizer_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent / "data"))
import real_tokenizers  # noqa: E402

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Reverse the words: cat dog"}],
    [{"role": "user", "content": "Count the words: sun sun sun"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! 12 apples."},
        {"role": "user", "content": "  and then?\n\nok"},
    ],
]


@contextlib.contextmanager
def llama(path: Path, **kwargs):
    """A llama.cpp model of ``path`` (closed on exit: its finalizer is noisy at interpreter exit)."""
    llm = llama_cpp.Llama(str(path), verbose=False, **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def top1_agreement(llm, model, ids: list[int]) -> float:
    """Share of the positions of ``ids`` where llama.cpp's and transformers' next-token argmax agree."""
    llm.reset()
    llm.eval(ids)
    ours = np.asarray(llm.scores[: len(ids)])
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0].float().numpy()
    return float((ours.argmax(-1) == theirs.argmax(-1)).mean())


def llama_cpp_chat_ids(llm, messages) -> list[int]:
    """The prompt ids llama-cpp-python's chat completion sends for ``messages``: the GGUF's own
    template (``tokenizer.chat_template``) rendered by its Jinja2ChatFormatter with the GGUF's BOS / EOS
    text, tokenized as its chat handler does."""
    text = functools.partial(llm._model.token_get_text)
    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=text(llm.token_eos()),
        bos_token=text(llm.token_bos()),
    )
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def training_ids(tokenizer, messages) -> list[int]:
    """The ids training and `sftrainer generate` give the generation prompt of ``messages``."""
    from sftrainer.generate import prompt_ids

    return prompt_ids(tokenizer, messages)


# ---- the built-in model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("qtype", ["f16", "bf16"])
def test_builtin_top1_matches_transformers_at_every_position(builtin_model, qtype, tmp_path):
    model, tok = builtin_model
    path = write_gguf(model, tok, tmp_path / "m.gguf", qtype)
    rows = [
        training_ids(tok, c) + tok(" dog cat<|im_end|>", add_special_tokens=False)["input_ids"]
        for c in CONVERSATIONS
    ]
    with llama(path, logits_all=True, n_ctx=128) as llm:
        assert [top1_agreement(llm, model, ids) for ids in rows] == [1.0] * len(rows)


def test_builtin_metadata_and_template_by_tokens(builtin_model, tmp_path):
    model, tok = builtin_model
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    with llama(path, vocab_only=True) as llm:
        meta = llm.metadata
        assert meta["tokenizer.chat_template"] == tok.chat_template  # verbatim
        assert meta["tokenizer.ggml.pre"] == "gpt-2"  # the built-in ByteLevel pre-tokenizer's pattern
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.convert_tokens_to_ids("<|im_end|>")
        assert int(meta["tokenizer.ggml.bos_token_id"]) == tok.bos_token_id
        assert meta["tokenizer.ggml.add_bos_token"] == "true"
        for messages in CONVERSATIONS:
            assert llama_cpp_chat_ids(llm, messages) == training_ids(tok, messages)


# ---- a LoRA run of the built-in model, exported through the CLI --------------------------------


@pytest.fixture(scope="module")
def exported(lora_run, tmp_path_factory):
    from sftrainer.cli import main

    def export(qtype: str) -> Path:
        out = tmp_path_factory.mktemp(f"gguf-{qtype}")
        assert main(["export", str(lora_run), str(out / "x"), "--format", "gguf", "--type", qtype]) == 0
        return out / "x" / f"model-{qtype}.gguf"

    return functools.cache(export)


@pytest.fixture(scope="module")
def run_model(lora_run):
    from sftrainer.generate import load_for_inference

    return load_for_inference(lora_run, dtype="float32")


# q8_0 (8-bit blocks of 32) is close, not equal: measured 112 of the 113 positions of these rows (the
# worst row 71 of 72); 0.95 per row is the bound asserted, so that a change of llama.cpp's kernels does
# not fail it and a broken layout (a few percent at best) does. f16 and bf16: every position.
AGREEMENT = {"f16": 1.0, "bf16": 1.0, "q8_0": 0.95}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0"])
def test_run_gguf_agrees_with_transformers_and_generate(exported, run_model, qtype):
    from sftrainer.generate import generate

    model, tok = run_model
    path = exported(qtype)
    rows = [
        training_ids(tok, c) + tok("dog cat<|im_end|>", add_special_tokens=False)["input_ids"]
        for c in CONVERSATIONS
    ]
    with llama(path, logits_all=True, n_ctx=256) as llm:
        rates = [top1_agreement(llm, model, ids) for ids in rows]
        print(qtype, "top-1 agreement", rates, "positions", sum(map(len, rows)))
        assert min(rates) >= AGREEMENT[qtype], rates
        for messages in CONVERSATIONS:
            assert llama_cpp_chat_ids(llm, messages) == training_ids(tok, messages)
            llm.reset()
            reply = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=16)
            # greedy, 16 new tokens at most, stopping at EOS: the same text (q8_0 included, on these prompts)
            assert reply["choices"][0]["message"]["content"].strip() == generate(
                model, tok, messages, max_new_tokens=16
            )


@pytest.mark.slow
def test_export_card_lists_the_file_and_how_to_serve_it(exported):
    path = exported("f16")
    card = (path.parent / "README.md").read_text()
    assert f"`{path.name}`" in card
    assert f"llama-cli -m {path.name}" in card and f"llama-server -m {path.name}" in card
    assert "--format gguf --type f16" in card


# ---- released tokenizers on a tiny random Llama ------------------------------------------------

# Each with a chat template: Llama 3.1's own; Mistral's instruct template; ChatML (with its tokens
# added, as a chat_template_path run adds them) on GPT-2.
REAL = {
    "llama-3.1-instruct": None,
    "mistral-7b-v0.1": (TEMPLATES / "mistral-7b-instruct-v0.1.jinja").read_text(),
    "gpt-2-gguf": CHATML,
}


@functools.cache
def real(name: str, tmp: str) -> tuple[object, Path]:
    """(tokenizer, GGUF of a 2-layer hidden-64 Llama with its vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    template = REAL[name]
    tok = real_tokenizers.load(name)
    if template == CHATML:
        tok = real_tokenizers.templated(
            real_tokenizers.with_tokens(name, ("<|im_start|>", "<|im_end|>")), CHATML
        )
    elif template is not None:
        tok = real_tokenizers.templated(tok, template)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    path = write_gguf(LlamaForCausalLM(config), tok, Path(tmp) / f"{name}.gguf", "f16")
    return tok, path


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("real-gguf"))


SPECIAL = {
    "llama-3.1-instruct": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>"],
    "mistral-7b-v0.1": ["<s>", "</s>"],
    "gpt-2-gguf": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
}
PIECES = ["hello", "World", " ", "  ", "\n", "\n\n", "\t", "123", "4567", "3.14", "'s", "'LL", "don't",
          "é", "日本語", "🙂", "ﬁ", "½", "Ⅻ", "_", "--", "...", "x", "    code()", "\r\n"]  # fmt: skip


def texts(name: str):
    """Text as a chat turn holds it: words, whitespace runs, newlines, digits, unicode, special tokens."""
    piece = st.one_of(
        st.sampled_from(PIECES),
        st.sampled_from(SPECIAL[name]),
        st.text(max_size=6),
        st.from_regex(r"\s{1,5}", fullmatch=True),
    )
    return st.lists(piece, max_size=12).map("".join)


def starts_with_space_segment(text: str, specials: list[str]) -> bool:
    """Whether a piece of ``text`` between special tokens (or at its start) begins with a space."""
    for special in specials:
        text = text.replace(special, "\0")
    return any(part.startswith(" ") for part in text.split("\0"))


@pytest.mark.parametrize("name", sorted(REAL))
def test_llama_cpp_tokenizes_as_transformers(name, real_dir):
    tok, path = real(name, real_dir)
    with llama(path, vocab_only=True) as llm:

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(texts(name))
        def check(text):
            if name == "mistral-7b-v0.1" and starts_with_space_segment(text, SPECIAL[name]):
                return  # the one known difference: test_sentencepiece_leading_space_difference
            expected = tok(text, add_special_tokens=True)["input_ids"]
            assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == expected

        check()


def test_sentencepiece_leading_space_difference(real_dir):
    """transformers' Metaspace (prepend_scheme 'always', tokenizers 0.22) prepends "▁" only where a
    piece does not already start with one; llama.cpp's SentencePiece tokenizer (add_space_prefix), like
    sentencepiece itself, always prepends one. So text that starts with a space (or follows a special
    token with a space) gets one more "▁" from llama.cpp. No GGUF key says "prepend unless present":
    this pins the difference, so that a change on either side shows here. It reaches a chat prompt where
    a template writes a space after a special token: Mistral's `</s> [INST]` between turns (one extra
    "▁" token per earlier turn, test_real_template_by_tokens); a single-turn prompt is identical."""
    tok, path = real("mistral-7b-v0.1", real_dir)
    with llama(path, vocab_only=True) as llm:
        assert tok(" leading")["input_ids"] == [1, 5374]  # <s> ▁leading
        assert llm.tokenize(b" leading", add_bos=True, special=True) == [1, 28705, 5374]  # <s> ▁ ▁leading


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_template_by_tokens(name, real_dir):
    tok, path = real(name, real_dir)
    with llama(path, vocab_only=True) as llm:
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        for messages in CONVERSATIONS:
            if name == "mistral-7b-v0.1":  # its template allows no system turn
                messages = [m for m in messages if m["role"] != "system"]
            ours = llama_cpp_chat_ids(llm, messages)
            if name == "mistral-7b-v0.1":
                # It writes `</s> [INST]` between turns: llama.cpp puts one more "▁" there
                # (test_sentencepiece_leading_space_difference); nothing else differs.
                eos, space = tok.eos_token_id, tok.convert_tokens_to_ids("▁")
                ours = [t for i, t in enumerate(ours) if not (t == space and i and ours[i - 1] == eos)]
            assert ours == training_ids(tok, messages)


@pytest.mark.parametrize(
    ("name", "pre", "eot"),
    [
        ("llama-3.1-instruct", "llama-bpe", None),
        ("gpt-2-gguf", "gpt-2", "<|im_end|>"),
        ("mistral-7b-v0.1", None, None),
    ],
)
def test_real_stop_tokens_and_pre_tokenizer(name, pre, eot, real_dir):
    tok, path = real(name, real_dir)
    with llama(path, vocab_only=True) as llm:
        meta = llm.metadata
        assert meta.get("tokenizer.ggml.pre") == pre
        assert int(meta["tokenizer.ggml.eos_token_id"]) == tok.eos_token_id
        expected_eot = str(tok.convert_tokens_to_ids(eot)) if eot else None
        assert meta.get("tokenizer.ggml.eot_token_id") == expected_eot


# ---- refusals --------------------------------------------------------------------------------


def test_unsupported_family_is_refused_by_name(builtin_model, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = builtin_model
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok)))
    supported = "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3, phi3"
    with pytest.raises(ConfigError, match=rf"model_type 'gpt2'; supported: {supported}"):
        write_gguf(model, tok, tmp_path / "m.gguf")


@pytest.mark.parametrize(
    ("model_type", "overrides", "message"),
    [
        ("gemma2", {"tie_word_embeddings": False}, "lm_head is not tied"),
        ("gemma2", {"attn_logit_softcapping": None}, "llama.cpp's gemma2 applies both"),
        ("gemma3_text", {"attn_logit_softcapping": 50.0}, "gemma3 graph has none"),
        ("gemma3_text", {"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        ("phi3", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
def test_what_llama_cpp_would_compute_differently_is_refused_by_name(
    builtin_model, model_type, overrides, message, tmp_path
):
    _, tok = builtin_model
    model = family_model(model_type, len(tok), **overrides)
    with pytest.raises(ConfigError, match=message):
        write_gguf(model, tok, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_split_pattern_is_refused_by_name():
    spec = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"\w+|\s"}}, "model": {}}
    with pytest.raises(ConfigError, match=r"llama.cpp has no name for.*supported: gpt-2, llama-bpe, qwen2"):
        pre_tokenizer_name(spec)


def test_missing_gguf_names_the_extra(monkeypatch, builtin_model, tmp_path):
    from sftrainer import gguf_export

    monkeypatch.setattr(gguf_export, "gguf_available", lambda: False)
    model, tok = builtin_model
    with pytest.raises(ConfigError, match=r"pip install 'sftrainer\[gguf\]'"):
        write_gguf(model, tok, tmp_path / "m.gguf")


# ---- the families, on tiny random models with the built-in vocabulary ----------------------------

GEMMA_LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
FAMILY_CONFIGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    # 4 layers with a window of 8 tokens (every row is longer), the soft-caps on, a query_pre_attn_scalar
    # that is not the head size (llama.cpp's scale is fixed by model size: folded into Q)
    # (tied: llama.cpp's gemma2 has no separate output matrix, and Gemma 2 ties it)
    "gemma2": {
        "num_hidden_layers": 4, "head_dim": 32, "sliding_window": 8, "query_pre_attn_scalar": 24,
        "tie_word_embeddings": True,
    },
    # a layer pattern that is not llama.cpp's default (every 6th layer global), Gemma 3 4B's global
    # RoPE (base 1e6, linear x8) against a local base of 1e4, a final soft-cap
    "gemma3_text": {
        "num_hidden_layers": 4, "head_dim": 32, "sliding_window": 8, "query_pre_attn_scalar": 24,
        "layer_types": GEMMA_LAYERS, "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
    },
    # fused qkv_proj / gate_up_proj; half the head rotated (Phi-4-mini rotates 3/4)
    "phi3": {
        "num_hidden_layers": 3, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
    },
}  # fmt: skip


def family_model(model_type: str, vocab_size: int, **overrides):
    """A model of ``model_type`` (2 layers unless FAMILY_CONFIGS says otherwise) with grouped-query
    attention, random weights scaled up so that the next-token argmax is decided (a random init's logits
    are nearly flat). ``gemma3``: the vision-language model, with a tiny vision tower."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
    }  # fmt: skip
    if model_type == "gemma3":
        text |= FAMILY_CONFIGS["gemma3_text"] | overrides | {"tie_word_embeddings": True}  # as released
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}  # fmt: skip
        config = AutoConfig.for_model(
            "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4, tie_word_embeddings=True
        )
    else:
        config = AutoConfig.for_model(model_type, **(text | FAMILY_CONFIGS[model_type] | overrides))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    norm_mean = 0.0 if model_type.startswith("gemma") else 1.0  # Gemma's norms scale by 1 + w
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(norm_mean if "norm" in name else 0.0, 0.3)  # biases and norms not trivial
            else:
                param.normal_(0.0, 0.2)
    return model


def family_rows(tok) -> list[list[int]]:
    return [
        training_ids(tok, c) + tok("dog cat<|im_end|>", add_special_tokens=False)["input_ids"]
        for c in CONVERSATIONS
    ]


def compare(path: Path, model, rows: list[list[int]], n_ctx: int, **kwargs) -> tuple[list[float], float]:
    """(top-1 agreement per row, max |logit difference| / logit range over the rows): llama.cpp on the
    GGUF at ``path`` against transformers' ``model``."""
    worst = 0.0
    with llama(path, logits_all=True, n_ctx=n_ctx, **kwargs) as llm:
        rates = [top1_agreement(llm, model, ids) for ids in rows]
        for ids in rows:
            llm.reset()
            llm.eval(ids)
            ours = np.asarray(llm.scores[: len(ids)])
            with torch.no_grad():
                theirs = model(torch.tensor([ids])).logits[0].float().numpy()
            worst = max(worst, float(np.abs(ours - theirs).max() / (theirs.max() - theirs.min())))
    return rates, worst


@pytest.mark.parametrize(
    "model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3"]
)
def test_family_top1_and_logits_match_transformers(builtin_model, model_type, tmp_path):
    _, tok = builtin_model
    model = family_model(model_type, len(tok))
    rows = family_rows(tok)
    rates, worst = compare(write_gguf(model, tok, tmp_path / "m.gguf", "f16"), model, rows, n_ctx=128)
    print(model_type, "top-1", rates, "positions", sum(map(len, rows)), f"max |diff| / range {worst:.2e}")
    assert rates == [1.0] * len(rows)
    assert worst < 0.05  # f16 weights: close, not equal


def test_gemma3_vision_language_checkpoint_is_written_as_its_text_model(builtin_model, tmp_path):
    from gguf import GGUFReader

    _, tok = builtin_model
    path = write_gguf(family_model("gemma3", len(tok)), tok, tmp_path / "m.gguf", "f16")
    names = {t.name for t in GGUFReader(path).tensors}
    assert "blk.3.attn_q_norm.weight" in names and "output.weight" not in names  # tied, as Gemma 3 is
    assert not [n for n in names if n.startswith(("v.", "mm."))]


def test_phi3_longrope_short_and_long_factors(builtin_model, tmp_path, monkeypatch):
    """LongRoPE: transformers takes the long factors for a sequence longer than the original context,
    llama.cpp for a context (n_ctx, a multiple of 256) longer than it; both scale cos/sin by the same
    attention factor. Original context 256 of 1024: rows under 256 tokens at n_ctx 256 (short factors),
    one row of more than 256 at n_ctx 512 (long). Weights written float32 and an f32 KV cache, so that
    only the order of arithmetic differs: a wrong factor shows far above the bound (f16 flips the
    argmax of near-ties of this random model: 23/24 and 337/339 positions, max 5e-3 of the range)."""
    from sftrainer import gguf_export

    _, tok = builtin_model
    generator = np.random.default_rng(0)
    rope = {
        "rope_type": "longrope", "rope_theta": 10_000.0, "original_max_position_embeddings": 256,
        "short_factor": generator.uniform(1.0, 2.0, 8).tolist(), "long_factor": generator.uniform(1.0, 8.0, 8).tolist(),
    }  # fmt: skip
    model = family_model(
        "phi3",
        len(tok),
        rope_parameters=rope,
        max_position_embeddings=1024,
        original_max_position_embeddings=256,
    )
    monkeypatch.setattr(gguf_export, "_encode", lambda gguf, array, qtype: (array.astype(np.float32), None))
    path = write_gguf(model, tok, tmp_path / "m.gguf", "f16")
    rows = family_rows(tok)
    f32_cache = {"type_k": 0, "type_v": 0}  # GGML_TYPE_F32
    short, short_diff = compare(path, model, rows, n_ctx=256, **f32_cache)
    long_row = [t for row in rows for t in row] * 3
    assert len(long_row) > 256
    long, long_diff = compare(path, model, [long_row], n_ctx=512, **f32_cache)
    print("phi3 longrope: short", short, f"{short_diff:.2e}", "long", long, len(long_row), f"{long_diff:.2e}")
    assert short == [1.0] * len(rows) and long == [1.0]
    assert max(short_diff, long_diff) < 1e-4  # measured 3.1e-6 and 3.7e-6
