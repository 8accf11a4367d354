"""LoRA settings (sftrainer/lora.py, the ``lora:`` section): rank-stabilised scaling, which modules
``target_modules`` reaches, ``modules_to_save`` as a trained full copy, and ``trainable_tokens``
training only their rows of the embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from tiny_models import quick_args, save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftrainer import SFTTrainer, builtin, lora
from sftrainer.errors import ConfigError
from sftrainer.run_config import LoraSettings, load_config

pytestmark = pytest.mark.slow

CHATS = [
    {"messages": [{"role": "user", "content": "Reverse the words: cat dog"}, {"role": "assistant", "content": "dog cat"}]},
    {"messages": [{"role": "user", "content": "Count the words: sun sun"}, {"role": "assistant", "content": "2"}]},
]  # fmt: skip
TURN_TOKENS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(builtin.model_dir())


@pytest.fixture(scope="module")
def untied_dir(tok, tmp_path_factory):
    """A tiny Llama whose lm_head is not tied to its input embeddings (the built-in model's is)."""
    return save_tiny_model("llama", tok, tmp_path_factory.mktemp("untied") / "model")


def wrap(model, settings: LoraSettings, tokenizer=None):
    return lora.apply(model, lora.peft_config_from(settings, tokenizer, model))


def lora_layers(model) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}


def test_rslora_scales_the_update_by_alpha_over_sqrt_r(untied_dir):
    """The layer adds scaling * B(A(x)); rsLoRA's scaling is alpha / sqrt(r), plain LoRA's alpha / r."""
    for use_rslora, expected in ((False, 8 / 16), (True, 8 / math.sqrt(16))):
        model = wrap(
            AutoModelForCausalLM.from_pretrained(untied_dir),
            LoraSettings(r=16, alpha=8, use_rslora=use_rslora),
        )
        layers = lora_layers(model)
        assert layers and {m.scaling["default"] for m in layers.values()} == {expected}
        layer = next(iter(layers.values()))
        torch.manual_seed(0)
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # B starts at zero: give the update a value
        layer.eval()  # no dropout
        x = torch.randn(3, layer.in_features)
        with torch.no_grad():
            update = layer(x) - layer.base_layer(x)
            by_hand = expected * layer.lora_B["default"](layer.lora_A["default"](x))
        torch.testing.assert_close(update, by_hand)


def test_all_linear_targets_every_linear_layer_but_lm_head(untied_dir):
    base = AutoModelForCausalLM.from_pretrained(untied_dir)
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linear
    model = wrap(base, LoraSettings(target_modules="all-linear"))
    wrapped = {n.removeprefix("base_model.model.") for n in lora_layers(model)}
    assert wrapped == linear - {"lm_head"}
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks


def test_target_modules_by_name(untied_dir):
    model = wrap(
        AutoModelForCausalLM.from_pretrained(untied_dir), LoraSettings(target_modules=["q_proj", "v_proj"])
    )
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == {"q_proj", "v_proj"}
    assert len(lora_layers(model)) == 4


def test_modules_to_save_trains_a_full_copy(untied_dir, tmp_path):
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, modules_to_save=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(untied_dir)
    original = model.lm_head.weight.detach().clone()
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, max_steps=3),
        train_dataset=CHATS,
        peft_config=lora.peft_config_from(settings),
    )
    trainer.train()
    head = trainer.model.get_base_model().lm_head
    copy = head.modules_to_save["default"].weight
    assert copy.requires_grad and not head.original_module.weight.requires_grad
    assert torch.equal(head.original_module.weight, original)  # the base's lm_head is untouched
    moved = (copy.detach() != original).float().mean().item()
    assert moved > 0.9, moved  # the copy trains in full, not a low-rank update
    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    heads = [w for n, w in saved.items() if "lm_head" in n]
    assert len(heads) == 1 and heads[0].shape == original.shape
    reloaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(untied_dir), tmp_path / "adapter"
    )
    assert torch.equal(reloaded.get_base_model().lm_head.modules_to_save["default"].weight, copy.detach())


def effective_embeddings(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embedding matrix, output projection matrix) as the model computes them, adapters included."""
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    vocab = model.get_base_model().config.vocab_size
    hidden = model.get_base_model().config.hidden_size
    with torch.no_grad():
        return embeddings(torch.arange(vocab)), head(torch.eye(hidden)).T  # [vocab, hidden] each


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainable_tokens_change_only_their_rows(tied, tok, untied_dir, tmp_path):
    """Tokens the base never trained (here the chat-template turn tokens): their input rows train, and
    so do their lm_head rows (tied: through the embeddings; untied: its own rows); no other row moves."""
    path = builtin.model_dir() if tied else untied_dir
    model = AutoModelForCausalLM.from_pretrained(path)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    settings = LoraSettings(r=4, alpha=8, dropout=0.0, trainable_tokens=TURN_TOKENS)
    trainer = SFTTrainer(
        model=model,
        args=quick_args(tmp_path, max_steps=3),
        train_dataset=CHATS,
        processing_class=tok,
        peft_config=lora.peft_config_from(settings, tok, model),
    )
    ids = sorted(tok.convert_tokens_to_ids(TURN_TOKENS))
    before = effective_embeddings(trainer.model)
    trainer.train()
    after = effective_embeddings(trainer.model)
    for old, new in zip(before, after):
        rows = torch.nonzero((old != new).any(dim=1)).flatten().tolist()
        assert rows == ids
    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter")
    for saved, trained in zip(effective_embeddings(reloaded), after):
        torch.testing.assert_close(saved, trained)


def test_trainable_tokens_from_yaml(tok):
    cfg = load_config(None, ["lora.trainable_tokens=['<|im_start|>', 3]", "lora.use_rslora=true"])
    model = AutoModelForCausalLM.from_pretrained(builtin.model_dir())
    config = lora.peft_config_from(cfg.lora, tok, model)
    assert config.use_rslora
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert config.trainable_token_indices == {"model.embed_tokens": [start, 3]}


def test_trainable_tokens_errors(tok):
    model = AutoModelForCausalLM.from_pretrained(builtin.model_dir())
    with pytest.raises(ConfigError, match=r"'<\|im_ned\|>' is not one token of the tokenizer \(did you mean"):
        lora.peft_config_from(LoraSettings(trainable_tokens=["<|im_ned|>"]), tok, model)
    with pytest.raises(ConfigError, match=r"ids \[100000\] are outside the embeddings' \d+ rows"):
        lora.peft_config_from(LoraSettings(trainable_tokens=[100000]), tok, model)
    with pytest.raises(ConfigError, match="an empty list trains nothing"):
        load_config(None, ["lora.trainable_tokens=[]"])


def test_seed_decides_the_initial_adapter(untied_dir, tmp_path):
    """LoRA's A matrices are random: the same seed gives the same adapter, in one process too."""
    from peft import LoraConfig

    def initial(seed):
        trainer = SFTTrainer(
            model=str(untied_dir),
            args=quick_args(tmp_path, seed=seed),
            train_dataset=CHATS,
            peft_config=LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first, again, other = initial(0), initial(0), initial(1)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in first)
