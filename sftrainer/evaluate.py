"""Generation-based evaluation: greedy exact match of the first trained response of each row.

Works from tokenized rows alone (``input_ids`` + ``labels``), so it applies to every data format:
the prompt is everything before the first trained token, the reference is that trained span.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from sftrainer.constants import IGNORE_INDEX


def split_prompt_reference(
    input_ids: Sequence[int], labels: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """(prompt ids, reference ids) for the first trained span, or None when nothing is trained."""
    start = next((i for i in range(1, len(labels)) if labels[i] != IGNORE_INDEX), None)
    if start is None:
        return None
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    return list(input_ids[:start]), list(input_ids[start:end])


@torch.no_grad()
def exact_match(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Sequence[int]]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> tuple[float, list[dict[str, str]]]:
    """Fraction of rows whose greedy completion equals the reference (special tokens and outer
    whitespace ignored). Returns the score and the (prompt, reference, prediction) of each row."""
    pairs = [p for p in (split_prompt_reference(r["input_ids"], r["labels"]) for r in rows) if p is not None]
    if not pairs:
        return 0.0, []
    # A reference ends with the end-of-turn token; stop generation on any of them. Only special or
    # added tokens qualify: a row cut by max_length ends mid-response, on an ordinary word that
    # must not stop the other rows' generation.
    turn_ends = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    stop = sorted({ref[-1] for _, ref in pairs if ref[-1] in turn_ends} | {tokenizer.eos_token_id})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    try:
        for lo in range(0, len(pairs), batch_size):
            chunk = pairs[lo : lo + batch_size]
            width = max(len(p) for p, _ in chunk)
            # Left padding, so every row's generation starts right after its prompt.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in chunk], device=device)
            new_tokens = min(max_new_tokens, max(len(r) for _, r in chunk) + 8)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=stop,
                pad_token_id=pad_id,
            )
            for (prompt, ref), generated in zip(chunk, out[:, width:].tolist()):
                samples.append(
                    {
                        "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                        "reference": tokenizer.decode(ref, skip_special_tokens=True).strip(),
                        "prediction": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                    }
                )
    finally:
        model.train(was_training)
    score = sum(s["reference"] == s["prediction"] for s in samples) / len(samples)
    return score, samples
