"""`sftrainer generate` and `sftrainer chat` on a short LoRA run: prompted with the training chat
template, stopped at the trained end-of-turn token, new text only; chat keeps history, streams,
resets; the real command in a terminal (tmux)."""

from __future__ import annotations

import io
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest
from peft import PeftModel
from tiny_models import ROWS, quick_args
from transformers import AutoModelForCausalLM

from sftrainer import SFTTrainer, builtin
from sftrainer import generate as gen
from sftrainer.cli import main
from sftrainer.evaluate import split_prompt_reference
from sftrainer.model import default_chat_template

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]

REVERSE, COUNT = "Reverse the words: cat dog", "Count the words: sun sun sun"


def reference_reply(run_dir, tokenizer, messages: list[dict[str, str]]) -> str:
    """Greedy generation with plain transformers + peft: template, generate until <|im_end|>, decode."""
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(builtin.model_dir()), run_dir
    ).eval()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(ids, max_new_tokens=256, do_sample=False, eos_token_id=end, pad_token_id=end)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


# ---- prompt and stop tokens ---------------------------------------------------------------


def test_prompt_ids_are_the_training_prompt(tiny_model_dir, tokenizer, tmp_path):
    """The generation prompt is token for token what training put before the trained response."""
    trainer = SFTTrainer(
        str(tiny_model_dir), args=quick_args(tmp_path), train_dataset=ROWS, processing_class=tokenizer
    )
    for row, prepared in zip(ROWS, trainer.train_dataset):
        prompt, _ = split_prompt_reference(prepared["input_ids"], prepared["labels"])
        assert gen.prompt_ids(tokenizer, [{"role": "user", "content": row["prompt"]}]) == prompt


def test_stop_tokens(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert gen.stop_token_ids(tokenizer) == [im_end]  # ChatML: <|im_end|> is also EOS here
    tokenizer.eos_token = "<pad>"  # an EOS the template does not use: both stop
    assert gen.stop_token_ids(tokenizer) == sorted([im_end, tokenizer.convert_tokens_to_ids("<pad>")])
    tokenizer.chat_template = default_chat_template(tokenizer)  # turns end with EOS
    assert gen.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}"  # no end token
    assert gen.stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


# ---- generate -----------------------------------------------------------------------------


def test_generate_command(lora_run, tokenizer, capsys):
    code = main(["generate", str(lora_run), "--prompt", COUNT])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == "3\n"  # learned, stopped at <|im_end|>, the new text only
    code = main(["generate", str(lora_run), "--prompt", REVERSE])
    out, _ = capsys.readouterr()
    assert out == reference_reply(lora_run, tokenizer, [{"role": "user", "content": REVERSE}]) + "\n"
    assert out.strip() and "<|im_end|>" not in out and "assistant" not in out


def test_generate_from_a_checkpoint_with_a_system_prompt(lora_run, tokenizer, capsys):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": REVERSE}]
    code = main(["generate", str(lora_run / "checkpoint-15"), "--prompt", REVERSE, "--system", "Be brief."])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == reference_reply(lora_run, tokenizer, messages) + "\n"


def test_generate_errors(tmp_path, capsys):
    code = main(["generate", str(tmp_path), "--prompt", "hi"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"sftrainer: error: {tmp_path} is not a run directory" in err


# ---- chat ---------------------------------------------------------------------------------


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_chat_keeps_history_streams_and_resets(lora_run, monkeypatch):
    model, tokenizer = gen.load_for_inference(lora_run)
    calls = []
    real = gen.generate

    def spy(model, tokenizer, messages, *args, **kwargs):
        calls.append([dict(m) for m in messages])
        return real(model, tokenizer, messages, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    lines = iter([REVERSE, "", COUNT, "/reset", COUNT, "/exit", "never read"])
    out = Recorder()
    # 16 new tokens: a reply that never stops (this model may repeat "dog") keeps the history in the context.
    history = gen.chat(model, tokenizer, lambda: next(lines), out, system="Be brief.", max_new_tokens=16)

    system = {"role": "system", "content": "Be brief."}
    first = {"role": "user", "content": REVERSE}
    assert calls[0] == [system, first]
    reply = {"role": "assistant", "content": real(model, tokenizer, [system, first], max_new_tokens=16)}
    assert calls[1] == [system, first, reply, {"role": "user", "content": COUNT}]  # history kept
    assert calls[2] == [system, {"role": "user", "content": COUNT}]  # /reset: the system prompt stays
    assert len(calls) == 3  # the empty line asked nothing; /exit ended it
    assert history[-1]["role"] == "assistant" and len(history) == 3
    assert "(history cleared)\n" in out.getvalue()
    assert out.writes > len(calls) * 2  # streamed: more than one write per reply


def test_chat_command_with_scripted_stdin(lora_run, tokenizer):
    """The real command in a process, standard input from a pipe; EOF ends it."""
    proc = subprocess.run(
        [sys.executable, "-m", "sftrainer", "chat", str(lora_run)],
        input=f"{COUNT}\n{REVERSE}\n/reset\n{REVERSE}\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    user = [{"role": "user", "content": COUNT}]
    first = reference_reply(lora_run, tokenizer, user)
    second = reference_reply(lora_run, tokenizer, [*user, {"role": "assistant", "content": first}, {"role": "user", "content": REVERSE}])  # fmt: skip
    fresh = reference_reply(lora_run, tokenizer, [{"role": "user", "content": REVERSE}])
    assert proc.stdout.splitlines() == [first, second, "(history cleared)", fresh]
    assert first == "3"
    assert "/reset clears the history, /exit or Ctrl-D ends" in proc.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (apt-get install -y tmux)")
def test_chat_in_a_terminal(lora_run, tmp_path):
    """`sftrainer chat` in a real terminal: the prompt shows, a typed line is answered, /reset, Ctrl-D ends it."""
    socket = f"sftrainer-test-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    env = " ".join(
        f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "SFTRAINER_HOME") if k in os.environ
    )
    command = f"env {env} {shlex.quote(sys.executable)} -m sftrainer chat {shlex.quote(str(lora_run))}; echo EXITED $?; sleep 60"

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", "chat"], capture_output=True, text=True
        ).stdout

    def wait_for(text: str, timeout: float = 180) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            shown = screen()
            if text in shown:
                return shown
            time.sleep(0.5)
        raise AssertionError(f"{text!r} never appeared; the screen:\n{screen()}")

    subprocess.run([*tmux, "new-session", "-d", "-s", "chat", "-x", "150", "-y", "40", command], check=True)
    try:
        wait_for(">>>")  # capture-pane drops trailing spaces
        subprocess.run([*tmux, "send-keys", "-t", "chat", COUNT, "Enter"], check=True)
        shown = wait_for(f">>> {COUNT}\n3\n>>>")
        assert "Traceback" not in shown
        subprocess.run([*tmux, "send-keys", "-t", "chat", "/reset", "Enter"], check=True)
        wait_for(">>> /reset\n(history cleared)\n>>>")
        subprocess.run([*tmux, "send-keys", "-t", "chat", "C-d"], check=True)
        wait_for("(history cleared)\n>>>\nEXITED 0")  # Ctrl-D ends it, on a line of its own
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)


def test_chat_drops_the_oldest_exchange_to_fit_the_context(lora_run, monkeypatch):
    model, tokenizer = gen.load_for_inference(lora_run)
    one_turn = len(gen.prompt_ids(tokenizer, [{"role": "user", "content": COUNT}]))
    monkeypatch.setattr(gen, "context_limit", lambda model: one_turn + 8 + 4)  # room for one exchange
    lines = iter([COUNT, COUNT])
    out = io.StringIO()

    def read():
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    history = gen.chat(model, tokenizer, read, out, max_new_tokens=8)
    assert "(the oldest turn was dropped to fit the model's context)" in out.getvalue()
    assert [m["role"] for m in history] == ["user", "assistant"]
