"""Use a trained run: one answer to a prompt (``sftrainer generate``) or a multi-turn chat
(``sftrainer chat``), prompted exactly as the model was trained.

The prompt is the tokenizer's chat template with ``add_generation_prompt=True``, tokenized the way
training tokenized it (the template's own special tokens, BOS added once when the tokenizer adds one
to text). Generation stops at EOS or at the end-of-turn token the template closes assistant turns
with (``<|im_end|>``, ``<|eot_id|>``, ...), and only the new text is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
from transformers import GenerationConfig, TextStreamer

from sftrainer.errors import DataError
from sftrainer.run import load_run_model, model_source, read_run
from sftrainer.setup import inference_processing_class
from sftrainer.vision.collate import prompt_inputs
from sftrainer.vision.processor import is_processor, text_tokenizer

logger = logging.getLogger(__name__)

PROBE = "\ufdd0sftrainer-probe\ufdd1"  # Unicode noncharacters: never in a template's own text


def load_for_inference(
    run_dir: str | Path, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a run directory: a full model, or an adapter on its base.
    For a vision-language model the "tokenizer" is its processor (saved with the run)."""
    run = read_run(run_dir)
    base_path = model_source(run, base)
    # A vision-language model's processor saved with the run, else its tokenizer; ready to prompt.
    tokenizer = inference_processing_class(str(run.path), base_path, trust_remote_code, str(run_dir))
    model = load_run_model(run, base_path, dtype=dtype, trust_remote_code=trust_remote_code)
    if run.is_adapter:
        logger.info("Loaded the LoRA adapter of %s on %s", run_dir, base_path)
    model.eval()
    return model, tokenizer


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template's generation prompt for ``messages``, as training tokenized it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [bos]
    if adds_bos and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the end-of-turn token of the chat template: the first special or added token that
    follows an assistant turn's text in the rendering (whitespace tokens before it are skipped)."""
    stops = {tokenizer.eos_token_id} - {None}
    specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception as err:  # a template that refuses this conversation: EOS alone
        logger.warning("Could not find the chat template's end-of-turn token (%s); stopping at EOS only", err)
        return sorted(stops)
    if PROBE in text:
        after = text.split(PROBE, 1)[1]
        for token in tokenizer(after, add_special_tokens=False)["input_ids"][:4]:
            if token in specials:
                stops.add(token)
                break
            if tokenizer.decode([token]).strip():
                break
    return sorted(stops)


class _Streamer(TextStreamer):
    """``TextStreamer`` writing to a stream instead of printing (the chat's output, or a test's)."""

    def __init__(self, tokenizer: Any, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    messages: list[dict[str, str]],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    stream: TextIO | None = None,
    stop: list[int] | None = None,
    images: Sequence[Any] = (),
) -> str:
    """The assistant's reply to ``messages`` (greedy when ``temperature`` is 0), new text only.
    With ``stream``, the text is also written there token by token as it is generated.

    With a vision-language processor as ``tokenizer``, ``images`` (paths, bytes or PIL images) fill
    the messages' ``{"type": "image"}`` parts in order, or go before the first user text."""
    if is_processor(tokenizer):
        inputs = {k: v.to(model.device) for k, v in prompt_inputs(tokenizer, messages, images).items()}
        tokenizer = tokenizer.tokenizer
    elif images:
        raise DataError("images need a vision-language model (this run's model is a text model)")
    else:
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=model.device)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ids = inputs["input_ids"]
    stop = stop if stop is not None else stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    sample = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        temperature=temperature if sample else None,
        top_p=None,
        top_k=None,
        eos_token_id=stop,
        pad_token_id=pad,
    )
    out = model.generate(
        **inputs,
        generation_config=config,
        streamer=_Streamer(tokenizer, stream) if stream is not None else None,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def context_limit(model: Any) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def chat(
    model: Any,
    tokenizer: Any,
    read_line: Callable[[], str],
    out: TextIO,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    images: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """A multi-turn chat: each line from ``read_line`` (which raises ``EOFError`` at the end) is a user
    turn; the reply streams to ``out``. ``/reset`` clears the history (the system prompt stays),
    ``/exit`` or end of input ends. Returns the history at the end.

    With a vision-language model, ``images`` go with the first user turn and ``/image PATH`` attaches
    an image to the next one; the history keeps them, and drops them with their exchange."""
    start: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    history = list(start)
    vision = is_processor(tokenizer)
    if images and not vision:
        raise DataError("images need a vision-language model (this run's model is a text model)")
    pending = list(images)  # images for the next user turn
    attached: list[Any] = []  # the history's images, in order
    stop = stop_token_ids(text_tokenizer(tokenizer))
    limit = context_limit(model)
    while True:
        try:
            line = read_line().strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, attached = list(start), []
            out.write("(history cleared)\n")
            out.flush()
            continue
        if line.startswith("/image"):
            if not vision:
                out.write("(/image needs a vision-language model)\n")
            else:
                pending.append(line.removeprefix("/image").strip())
                out.write(f"(image attached to your next message: {pending[-1]})\n")
            out.flush()
            continue
        if not line:
            continue
        if pending:
            parts = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
            history.append({"role": "user", "content": parts})
            attached, pending = attached + pending, []
        else:
            history.append({"role": "user", "content": line})
        while limit and len(history) > len(start) + 1:
            if _prompt_length(tokenizer, history, attached) + max_new_tokens <= limit:
                break
            dropped = history[len(start) : len(start) + 2]  # the oldest exchange, with its images
            del history[len(start) : len(start) + 2]
            attached = attached[sum(_image_parts(m) for m in dropped) :]
            out.write("(the oldest turn was dropped to fit the model's context)\n")
        reply = generate(
            model, tokenizer, history, max_new_tokens, temperature, stream=out, stop=stop, images=attached
        )
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": reply})
    return history


def _prompt_length(tokenizer: Any, history: list[dict[str, Any]], images: Sequence[Any]) -> int:
    if is_processor(tokenizer):
        return int(prompt_inputs(tokenizer, history, images)["input_ids"].shape[1])
    return len(prompt_ids(tokenizer, history))


def _image_parts(message: dict[str, Any]) -> int:
    content = message.get("content")
    return (
        sum(isinstance(p, dict) and p.get("type") == "image" for p in content)
        if isinstance(content, list)
        else 0
    )
