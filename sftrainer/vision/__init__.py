"""Vision-language support: the image strategy of the one data pipeline, not a pipeline of its own.

Contract: a row may carry images; everything that differs for them lives here, by noun, and the rest
of sftrainer reaches them through these modules only (``sftrainer.vision.<module>``; this file
imports nothing, so ``import sftrainer.vision.builtin`` stays light):

- ``images``: where a row's images are and how to read them (``split_images``, ``load_image``,
  ``lift_images``, ``ImageRef``); pure functions over one row.
- ``processor``: what a processor is and says (``is_processor``, ``text_tokenizer``, ``placeholder``,
  ``feature_token_ids``, ``preview_decoder``).
- ``encode``: ``VisionTokenizer``, the encoder of rows with images (a ``data.tokenize.RowEncoder``, which
  ``data.prepare.prepare`` runs as it runs the text one: the one prepare path); it renders and encodes
  through the text pipeline's ``ExampleTokenizer`` with each image's expansion put in between, cuts
  rows never inside an image, and its ``ImageReader`` finds and reads the image column.
- ``pack``: ``pack_with_images``, packing that keeps each row's images with it.
- ``collate``: ``VisionCollator`` (the text collators' layout plus the processor's pixel inputs) and
  ``prompt_inputs`` for generation.
- ``model``: the processor made ready (``prepare_processor``), what trains (``adapt_for_training``),
  which families can pack (``packing_problem``).
- ``probe``: ``check_isolation``, the isolation probe for packed rows with images.
- ``builtin``: the tiny built-in LLaVA (``builtin-vlm``); imports nothing from sftrainer.

Layers: ``images``, ``processor``, ``encode``, ``pack`` and ``collate`` sit beside ``sftrainer.data``
(they import ``data``, ``constants`` and ``errors``, and nothing above); ``model`` and ``probe`` sit on
the model layer (``sftrainer.model``, ``sftrainer.isolation``). The pure modules of ``data/`` never
import this package: the pipeline, which orchestrates, picks the image strategy when the processing
class is a processor.
"""
