"""Generation-based evaluation: greedy (or sampled) completions of prompts, scored against references.

Works from tokenized rows alone (``input_ids`` + ``labels``), so it applies to every data format:
the prompt is everything before the first trained token, the reference is that trained span. Plain
prompts (``generation_prompts``) are prepared the same way, with a placeholder response that only
locates where the answer starts; they have no reference.

Scores per sample: ``exact_match`` (the texts are equal, outer whitespace ignored) and
``normalized_match`` (equal after ``normalize_text``) where a reference exists, and whatever a
user scorer (``load_scorer``) returns; ``mean_scores`` averages each over the samples that have it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sftrainer.constants import IGNORE_INDEX
from sftrainer.data import load as data_load
from sftrainer.errors import ConfigError

logger = logging.getLogger(__name__)

Scorer = Callable[[str, "str | None", str], "float | dict[str, float]"]
# Metric names the evaluation loop already uses: a scorer must not overwrite them.
RESERVED = {"loss", "perplexity", "runtime", "samples_per_second", "steps_per_second", "epoch"}
RESERVED |= {"mean_token_accuracy", "entropy", "num_tokens", "exact_match", "normalized_match"}


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


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style answer normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@functools.lru_cache(maxsize=8)
def load_scorer(spec: str) -> Scorer:
    """``module:function`` or ``path/to/file.py:function`` -> the function. Raises ``ConfigError``."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(
            f"generation_scorer: expected 'module:function' or 'path/to/file.py:function', got {spec!r}"
        )
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module_spec = importlib.util.spec_from_file_location(f"sftrainer_scorer_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(where)
    except Exception as err:  # the user's module may raise anything while importing
        raise ConfigError(
            f"generation_scorer: cannot import {where!r}: {type(err).__name__}: {err}"
        ) from None
    scorer = getattr(module, name, None)
    if not callable(scorer):
        raise ConfigError(f"generation_scorer: {where!r} has no function {name!r}")
    return scorer


def score_sample(sample: dict[str, Any], scorer: Scorer | None = None) -> dict[str, float]:
    """The scores of one sample (``prompt``, ``reference`` (None: no reference), ``prediction``)."""
    prediction, reference = sample["prediction"], sample["reference"]
    scores: dict[str, float] = {}
    if reference is not None:
        scores["exact_match"] = float(prediction == reference)
        scores["normalized_match"] = float(normalize_text(prediction) == normalize_text(reference))
    if scorer is not None:
        result = scorer(prediction, reference, sample["prompt"])
        named = result if isinstance(result, dict) else {getattr(scorer, "__name__", "score"): result}
        for key, value in named.items():
            if key in RESERVED:
                raise ConfigError(f"generation_scorer: returns {key!r}, a name sftrainer already reports")
            scores[str(key)] = float(value)
    return scores


def mean_scores(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Each score averaged over the samples that have it."""
    totals: dict[str, list[float]] = {}
    for sample in samples:
        for key, value in sample["scores"].items():
            totals.setdefault(key, []).append(value)
    return {key: sum(values) / len(values) for key, values in totals.items()}


# Stands in for the response of a prompt without reference: its tokens only say where the answer starts.
PLACEHOLDER = "x"


def generation_prompt_rows(prompts: str | list[str]) -> tuple[Any, list[bool]]:
    """``generation_prompts`` -> rows for the data pipeline, and which ones carry a real reference.

    A list of strings, or a file of ``prompt`` (+ ``reference``) rows, become prompt/response rows;
    a file in any other format is used as is, its trained span being the reference.
    """
    if isinstance(prompts, str):
        dataset = data_load.load(prompts, f"generation_prompts ({prompts})")
        if not set(dataset.column_names) <= {"prompt", "reference"}:
            return dataset, [True] * len(dataset)
        pairs = [(row["prompt"], row.get("reference")) for row in dataset]
    else:
        pairs = [(str(p), None) for p in prompts]
    rows = [{"prompt": p, "response": r if r not in (None, "") else PLACEHOLDER} for p, r in pairs]
    return rows, [r not in (None, "") for _, r in pairs]


@torch.no_grad()
def generate_samples(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Sequence[int]]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
    temperature: float = 0.0,
    has_reference: Sequence[bool] | None = None,
    scorer: Scorer | None = None,
) -> list[dict[str, Any]]:
    """Complete each row's prompt (batched, left-padded) and score it.

    Returns one dict per row with a trained span: ``prompt``, ``reference`` (None where
    ``has_reference`` says the span is a placeholder), ``prediction`` and ``scores``.
    ``temperature`` 0 is greedy decoding.
    """
    flags = list(has_reference) if has_reference is not None else [True] * len(rows)
    items = []
    for row, flag in zip(rows, flags):
        pair = split_prompt_reference(row["input_ids"], row["labels"])
        if pair is not None:
            items.append((*pair, flag))
    if not items:
        return []
    # A reference ends with the end-of-turn token; stop generation on any of them. Only special or
    # added tokens qualify: a row cut by max_length ends mid-response, on an ordinary word that
    # must not stop the other rows' generation.
    turn_ends = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    stop = sorted({ref[-1] for _, ref, _ in items if ref[-1] in turn_ends} | {tokenizer.eos_token_id})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    samples = []
    try:
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            width = max(len(p) for p, _, _ in chunk)
            # Left padding, so every row's generation starts right after its prompt.
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p, _, _ in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _, _ in chunk], device=device)
            # References bound the answer length; a prompt without one gets the whole budget.
            longest = max(len(r) if flag else max_new_tokens for _, r, flag in chunk)
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=min(max_new_tokens, longest + 8),
                eos_token_id=stop,
                pad_token_id=pad_id,
                **sampling,
            )
            for (prompt, ref, flag), generated in zip(chunk, out[:, width:].tolist()):
                sample = {
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                    "reference": tokenizer.decode(ref, skip_special_tokens=True).strip() if flag else None,
                    "prediction": tokenizer.decode(generated, skip_special_tokens=True).strip(),
                }
                sample["scores"] = score_sample(sample, scorer)
                samples.append(sample)
    finally:
        model.train(was_training)
    return samples


def exact_match(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Sequence[int]]],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of rows whose greedy completion equals the reference (special tokens and outer
    whitespace ignored), and the samples (``generate_samples``)."""
    samples = generate_samples(model, tokenizer, rows, max_new_tokens, batch_size)
    return mean_scores(samples).get("exact_match", 0.0), samples


def format_samples(samples: Sequence[dict[str, Any]], limit: int = 3, width: int = 60) -> str:
    """A small text table of the first samples, for the log."""

    def cut(text: str | None) -> str:
        text = "-" if text is None else " ".join(text.split())
        return text if len(text) <= width else "..." + text[-(width - 3) :]

    lines = []
    for sample in samples[:limit]:
        scores = " ".join(f"{k}={v:.3g}" for k, v in sample["scores"].items())
        lines += [
            f"  prompt:     {cut(sample['prompt'])}",
            f"  reference:  {cut(sample['reference'])}",
            f"  prediction: {cut(sample['prediction'])}" + (f"   [{scores}]" if scores else ""),
        ]
    return "\n".join(lines)
