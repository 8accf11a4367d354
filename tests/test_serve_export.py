"""vLLM / SGLang export: the compatibility decisions on small adapter configs, and the written adapter
loads with plain PEFT on the base and gives the run's logits. No server runs here."""

from __future__ import annotations

import json
import shutil

import pytest

from sftrainer.errors import RunDirError
from sftrainer.serve_export import CHAT_TEMPLATE_FILE, export_for_server, serve_problems

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(**kw):
    return {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": LLAMA, "bias": "none", **kw}


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_a_plain_adapter_is_served_without_flags(server):
    check = serve_problems(_config(), server)
    assert check.problems == [] and check.flags == []


@pytest.mark.parametrize("server", ["vllm", "sglang"])
def test_dora_modules_to_save_and_trainable_tokens_are_refused(server):
    adapter = _config(
        use_dora=True, modules_to_save=["lm_head"], trainable_token_indices={"embed_tokens": [5]}
    )
    problems = serve_problems(adapter, server).problems
    assert len(problems) == 3
    assert any("DoRA" in p for p in problems)
    assert any("modules_to_save ['lm_head']" in p for p in problems)
    assert any("trainable tokens" in p for p in problems)


def test_vllm_rank_above_16_needs_the_next_allowed_max_lora_rank():
    assert serve_problems(_config(r=16), "vllm").flags == []
    assert serve_problems(_config(r=32), "vllm").flags == ["--max-lora-rank", "32"]
    assert serve_problems(_config(r=24), "vllm").flags == ["--max-lora-rank", "32"]
    assert serve_problems(_config(r=8, rank_pattern={"q_proj": 100}), "sglang").flags == []
    too_big = serve_problems(_config(r=1024), "vllm").problems
    assert too_big and "at most 512" in too_big[0]
    # SGLang infers its maximum rank from the adapters it is launched with
    assert serve_problems(_config(r=64), "sglang").flags == []


def test_unsupported_target_modules_are_named():
    problems = serve_problems(_config(target_modules=["q_proj", "fc_in", "wte"]), "vllm").problems
    assert len(problems) == 1 and "['fc_in', 'wte']" in problems[0]
    assert "pattern" in serve_problems(_config(target_modules=r".*\.q_proj"), "sglang").problems[0]
    check = serve_problems(_config(target_modules=["q_proj", "lm_head"]), "vllm")
    assert check.problems == [] and "lm_head" in check.notes[0]


def test_server_specific_decisions():
    # rsLoRA: vLLM scales by alpha/sqrt(r) (peft_helper.py); SGLang reads no use_rslora
    assert serve_problems(_config(use_rslora=True), "vllm").problems == []
    assert "use_rslora" in serve_problems(_config(use_rslora=True), "sglang").problems[0]
    # per-module ranks: SGLang reads rank_pattern, vLLM does not
    assert serve_problems(_config(rank_pattern={"q_proj": 4}), "sglang").problems == []
    assert "rank_pattern" in serve_problems(_config(rank_pattern={"q_proj": 4}), "vllm").problems[0]
    assert "bias" in serve_problems(_config(bias="all"), "vllm").problems[0]
    assert "not LoRA" in serve_problems({"peft_type": "IA3"}, "vllm").problems[0]


def test_nothing_is_written_when_it_cannot_be_served(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    config = json.loads((run / "adapter_config.json").read_text())
    (run / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True, "r": 1024}))
    with pytest.raises(RunDirError) as err:
        export_for_server(run, tmp_path / "out", "vllm")
    assert "DoRA" in str(err.value) and "at most 512" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_written_adapter_loads_with_peft_and_gives_the_runs_logits(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sftrainer.run import load_run_model, read_run

    report = export_for_server(lora_run, tmp_path / "demo", "vllm")
    assert sorted(p.name for p in report.out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert report.command == (
        f"vllm serve {report.base} --enable-lora --lora-modules demo={(tmp_path / 'demo').resolve()}"
    )
    assert report.request["model"] == "demo"
    assert report.prompt.endswith("<|im_start|>assistant\n")  # the built-in template, generation prompt
    assert "vllm serve" in report.text()

    ids = torch.tensor([[1, 5, 9, 12, 3, 7]])
    run_model = load_run_model(read_run(lora_run)).eval()
    served = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(report.base), report.out_dir
    ).eval()
    with torch.no_grad():
        expected, got = run_model(ids).logits, served(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    base = AutoModelForCausalLM.from_pretrained(report.base).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected)  # the adapter changes the logits


def test_a_template_that_is_not_the_bases_is_written_and_passed(lora_run, tmp_path):
    from transformers import AutoTokenizer

    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    tokenizer = AutoTokenizer.from_pretrained(run)
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
    )
    tokenizer.save_pretrained(run)
    report = export_for_server(run, tmp_path / "out", "sglang", name="mine")
    written = report.out_dir / CHAT_TEMPLATE_FILE
    assert written.read_text() == tokenizer.chat_template
    assert report.command.endswith(
        f"--lora-paths mine={report.out_dir.resolve()} --chat-template {written.resolve()}"
    )
    assert report.command.startswith(
        f"python -m sglang.launch_server --model-path {report.base} --enable-lora"
    )
    assert report.request["model"] == f"{report.base}:mine"
    assert report.prompt == "<|im_start|>user: Reverse the words: cat dog<|im_end|>"
