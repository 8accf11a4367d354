"""``sftrainer export --format ollama | vllm | sglang`` end to end on the built-in model's LoRA run: the files
each writes, the model card naming each with the command that serves it, and what the command prints. (The
GGUF itself is checked against llama.cpp in tests/test_gguf.py, the Modelfile's TEMPLATE in
tests/test_ollama.py, the adapter checks in tests/test_serve_export.py.)"""

from __future__ import annotations

import pytest

from sftrainer.cli import main


def test_ollama_writes_the_gguf_and_a_modelfile_for_it(lora_run, tmp_path, capsys):
    pytest.importorskip("gguf", reason="the gguf extra: pip install 'sftrainer[gguf]'")
    out = tmp_path / "ollama"
    assert main(["export", str(lora_run), str(out), "--format", "ollama", "--name", "tiny"]) == 0
    printed = capsys.readouterr().out
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.splitlines()[0] == "FROM ./model-f16.gguf"
    assert "TEMPLATE" in modelfile and 'PARAMETER stop "' in modelfile
    assert (out / "model-f16.gguf").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert "ollama create tiny -f Modelfile" in card and "model-f16.gguf" in card
    assert f"cd {out} && ollama create tiny -f Modelfile" in printed


@pytest.mark.parametrize(("server", "command"), [("vllm", "vllm serve "), ("sglang", "sglang.launch_server")])
def test_servers_get_the_adapter_and_the_command(lora_run, tmp_path, capsys, server, command):
    out = tmp_path / server
    assert main(["export", str(lora_run), str(out), "--format", server]) == 0
    printed = capsys.readouterr().out
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert command in printed and "/v1/chat/completions" in printed
    card = (out / "README.md").read_text()
    assert command in card


def test_a_full_model_run_is_not_exported_as_an_adapter(lora_run, tmp_path, capsys):
    """The server formats take adapter runs: a full run is refused with what to do instead."""
    merged = tmp_path / "merged"
    assert main(["merge", str(lora_run), str(merged)]) == 0
    assert main(["export", str(merged), str(tmp_path / "v"), "--format", "vllm"]) != 0
    assert "holds a full model, not a LoRA adapter" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()
