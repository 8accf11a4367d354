"""What a multimodal processor is and what it says about images: pure questions asked of a
``processing_class`` (tokenizer or processor), importing nothing above ``sftrainer.errors``.

- ``is_processor``: a processor with an image processor and a tokenizer (not a bare tokenizer);
  ``text_tokenizer``: its tokenizer, or the tokenizer itself.
- ``placeholder``: the text the processor expands into an image's tokens; ``feature_token_ids``: the
  ids the model replaces by image features.
- ``CollapsedImages`` / ``preview_decoder``: what decodes rows for people, each run of image tokens
  written once (``<image>×576``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sftrainer.errors import ConfigError


def is_processor(obj: Any) -> bool:
    """A multimodal processor with an image processor and a tokenizer (not a bare tokenizer)."""
    from transformers import ProcessorMixin  # heavy: imported when first asked, not with the package

    return isinstance(obj, ProcessorMixin) and hasattr(obj, "image_processor") and hasattr(obj, "tokenizer")


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer of a processor, or the tokenizer itself."""
    return processing_class.tokenizer if is_processor(processing_class) else processing_class


def preview_decoder(processing_class: Any) -> Any:
    """What decodes rows for people: a processor's runs of image tokens written once (``<image>×576``)."""
    return CollapsedImages(processing_class) if is_processor(processing_class) else processing_class


def placeholder(processor: Any) -> str:
    """The text the processor expands into an image's tokens (``<image>``, Gemma 3's ``<start_of_image>``)."""
    token = getattr(processor, "image_token", None)
    if not isinstance(token, str) or not token:
        raise ConfigError(
            f"{type(processor).__name__} has no image_token: sftrainer cannot tell where its images go"
        )
    return token


def feature_token_ids(processor: Any) -> frozenset[int]:
    """Ids of the tokens the model replaces by image features (repeated once per feature)."""
    ids = {i for i in getattr(processor, "image_token_ids", None) or [] if isinstance(i, int)}
    if not ids:
        ids = {processor.tokenizer.convert_tokens_to_ids(placeholder(processor))}
    return frozenset(ids)


class CollapsedImages:
    """A processor's ``decode`` that writes each run of image tokens once, as ``<image>×576``: what
    ``sftrainer data`` and the run report show of a row (not 576 placeholders)."""

    def __init__(self, processor: Any):
        self.tokenizer = processor.tokenizer
        self.feature_ids = feature_token_ids(processor)

    def decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        out, start = [], 0
        ids = list(ids)
        for k in range(1, len(ids) + 1):
            if k == len(ids) or (ids[k] in self.feature_ids) != (ids[start] in self.feature_ids):
                if ids[start] in self.feature_ids:
                    out.append(f"{self.tokenizer.convert_ids_to_tokens(ids[start])}×{k - start}")
                else:
                    out.append(self.tokenizer.decode(ids[start:k], **kwargs))
                start = k
        return "".join(out)
