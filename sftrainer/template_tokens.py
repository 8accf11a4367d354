"""Tokens a chat template brings that the model has never seen (``chat_template_path``).

Giving a base model a chat template, e.g. ChatML from ``chat_template_path="Qwen/Qwen3-0.6B"``, usually
needs tokens its tokenizer lacks (``<|im_start|>``, ``<|im_end|>``). As TRL's ``clone_chat_template``:

1. ``template_tokens``: the source tokenizer's added tokens that its template writes, and its EOS,
   where the training tokenizer lacks them (``prepare_tokenizer`` adds them to its copy);
2. ``grow_embeddings``: the model gets rows for them: the embeddings (and an untied ``lm_head``) grow
   to ``len(tokenizer)`` rounded up to a multiple of ``EMBEDDING_MULTIPLE``; never shrunk;
3. ``trainable_rows``: their rows train. A full fine-tune trains every row; with LoRA, PEFT's
   ``trainable_token_indices`` trains just those rows of the embeddings and of an untied ``lm_head``.

Unlike TRL: only the tokens the template uses are added (TRL adds every added token of the source),
the tokenizer gets no filler tokens when the embeddings are rounded up, and ``lm_head`` trains those
rows only (TRL adds the whole ``lm_head`` to ``modules_to_save``). Each step is logged.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from sftrainer.constants import EMBEDDING_MULTIPLE
from sftrainer.errors import ConfigError

logger = logging.getLogger(__name__)


def template_tokens(source: Any, template: str, tokenizer: Any) -> list[Any]:
    """The added tokens (``AddedToken``, ``special`` flag kept) of ``source`` that ``template`` writes,
    and ``source``'s EOS, that ``tokenizer`` lacks, in ``source``'s id order."""
    vocab = tokenizer.get_vocab()
    added = sorted(source.added_tokens_decoder.items())
    wanted = [token for _, token in added if token.content in template or token.content == source.eos_token]
    return [token for token in wanted if token.content not in vocab]


def new_token_ids(before: Any, after: Any) -> list[int]:
    """Ids of the tokens ``after`` (a tokenizer) has and ``before`` has not."""
    known = set(before.get_vocab())
    return sorted(i for token, i in after.get_vocab().items() if token not in known)


def grow_embeddings(model: Any, tokenizer: Any, ids: list[int], callers_model: bool) -> None:
    """Resize ``model``'s token embeddings (in place) so that every id of ``tokenizer`` has a row.
    ``ConfigError`` (before any change) for a model that already carries a PEFT adapter."""
    if ids and hasattr(model, "peft_config"):
        names = ", ".join(tokenizer.convert_ids_to_tokens(ids))
        raise ConfigError(
            f"chat_template_path: the template adds tokens the model has no trained rows for ({names}), and "
            "the model already carries a PEFT adapter, which cannot train them: pass the base model with "
            "peft_config=, or use a template whose tokens the model has"
        )
    rows = model.get_input_embeddings().weight.shape[0]
    if not ids or max(ids) < rows:
        return
    size = -(-len(tokenizer) // EMBEDDING_MULTIPLE) * EMBEDDING_MULTIPLE
    # transformers initialises the new rows at the mean of the old ones (mean_resizing).
    model.resize_token_embeddings(size)
    log = logger.warning if callers_model else logger.info
    log(
        "chat_template_path: the model's token embeddings grew from %d to %d rows for %d new tokens%s",
        rows,
        size,
        len(ids),
        " (the model you passed is resized in place)" if callers_model else "",
    )


def trainable_rows(model: Any, peft_config: Any, tokenizer: Any, ids: list[int]) -> Any:
    """The PEFT config to use so that the rows of ``ids`` train (a copy of ``peft_config`` where it
    changes); call after ``grow_embeddings``. ``ConfigError`` for PEFT methods other than LoRA."""
    if not ids:
        return peft_config
    names = ", ".join(tokenizer.convert_ids_to_tokens(ids))
    if peft_config is None:
        if not model.get_input_embeddings().weight.requires_grad:
            logger.warning("chat_template_path: the new tokens' embedding rows are frozen (%s)", names)
        return None
    if not hasattr(peft_config, "trainable_token_indices"):
        raise ConfigError(
            f"chat_template_path: the template adds tokens the model has no trained rows for ({names}); "
            f"PEFT {type(peft_config).__name__} cannot train their embedding rows: use LoRA "
            "(trainable_token_indices) or a full fine-tune, or a template whose tokens the model has"
        )
    from sftrainer.lora import trainable_token_indices  # peft, imported where an adapter is built

    config = copy.deepcopy(peft_config)  # the caller's config is left as it was
    wanted = trainable_token_indices(ids, tokenizer, model)
    assert isinstance(wanted, dict)  # the model is given and ids is not empty: rows by module
    given = config.trainable_token_indices
    if isinstance(given, list):  # PEFT: a list means the input embeddings' rows
        given = {next(iter(wanted)): given}
    merged = dict(given or {})
    for module, rows in wanted.items():
        merged[module] = list(dict.fromkeys([*merged.get(module, []), *rows]))
    config.trainable_token_indices = merged
    logger.warning(
        "chat_template_path: %d new tokens (%s) train their rows of %s through LoRA's trainable_token_indices",
        len(ids),
        names,
        " and ".join(wanted),
    )
    return config
