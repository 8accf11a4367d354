"""DataPipeline: the ONE preparation path, raw data -> rows the collator takes (load, tokenize, truncate,
pack, shuffle), with the counts of each step.

Contract: training (``SFTTrainer``: the train and eval sets given to its constructor, and the raw eval sets
given to ``evaluate`` later) and ``sftrainer data`` (``sftrainer.preview``, with ``shuffle=False``) prepare
every data set through this class, so the rows the preview shows are the rows trained. It orchestrates the
pure functions of ``sftrainer.data`` (and the image strategy of ``sftrainer.vision``); the settings they get
come from one function, ``prepare_settings``.

Output rows: ``input_ids``, ``labels`` (``IGNORE_INDEX`` on untrained tokens), plus ``position_ids``
when packed, and ``images`` with a vision-language processor (``sftrainer.vision``). With
``dataset_kwargs={"skip_prepare_dataset": True}`` (TRL) the rows are used as given.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from datasets import Dataset, IterableDataset

from sftrainer.config import SFTConfig
from sftrainer.constants import FIRST_ROWS, IMAGE_COLUMNS, LOSS_MASK_COLUMNS
from sftrainer.data import load as data_load
from sftrainer.data.mixture import Mixture, prepare_mixture
from sftrainer.data.pack import PackStats, StreamPacker, pack_dataset
from sftrainer.data.prepare import DataSettings, PrepareStats, prepare
from sftrainer.distributed import main_process_first
from sftrainer.errors import ConfigError, DataError
from sftrainer.vision.encode import VisionTokenizer
from sftrainer.vision.images import lift_images
from sftrainer.vision.pack import pack_with_images
from sftrainer.vision.processor import is_processor

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 1000  # rows held by a streaming shuffle
STREAM_PACK_ROWS = 2000  # rows of a stream packed together (best-fit decreasing within them)


def prepare_settings(args: SFTConfig, pack: bool) -> DataSettings:
    """The settings rows are prepared with: ``args.data_settings()``, without ``max_length`` when a packing
    strategy that cuts long rows itself ('bfd_split', 'wrapped') packs them."""
    settings = args.data_settings()
    if pack and args.packing_strategy in ("bfd_split", "wrapped"):
        settings = dataclasses.replace(settings, max_length=None)  # the packer cuts long rows
    return settings


class DataPipeline:
    """Prepares data sets for one tokenizer and config; ``data_stats`` / ``pack_stats`` hold the counts by
    name, ``source_stats`` each source's counts of a mixture. ``shuffle=False`` leaves the rows in order
    where ``args.shuffle_dataset`` would shuffle them (``sftrainer data``); ``keep_rows=True`` keeps each
    data set's prepared rows before packing in ``rows`` (what ``sftrainer data`` shows)."""

    def __init__(
        self,
        tokenizer: Any,
        args: SFTConfig,
        formatting_func: Callable[[dict[str, Any]], Any] | None = None,
        *,
        shuffle: bool = True,
        keep_rows: bool = False,
    ):
        self.tokenizer = tokenizer
        self.args = args
        self.formatting_func = formatting_func
        self.shuffle = shuffle
        self.keep_rows = keep_rows
        self.data_stats: dict[str, PrepareStats] = {}
        self.pack_stats: dict[str, PackStats] = {}
        self.source_stats: dict[str, list[PrepareStats]] = {}
        self.rows: dict[str, Dataset | IterableDataset] = {}  # with keep_rows: before packing and shuffling
        self._prepared: list[Any] = []  # what this pipeline returned: passed again, used as is
        # The first prepared rows of each data set, before shuffling and packing: the rows
        # `sftrainer data` shows first, which the run report previews too (report.save_run_inputs).
        self.first_rows: dict[str, list[dict[str, Any]]] = {}
        self._noted: set[str] = set()
        self.vision = is_processor(tokenizer)  # a vision-language processor: rows with images

    @property
    def skip(self) -> bool:
        return bool((self.args.dataset_kwargs or {}).get("skip_prepare_dataset"))

    def is_prepared(self, dataset: Any) -> bool:
        return any(dataset is done for done in self._prepared)

    def __call__(self, dataset: Any, name: str, pack: bool) -> Dataset | IterableDataset:
        """Prepare one data set (a Dataset, IterableDataset, list of dicts, file path...)."""
        if self.is_prepared(dataset):
            return dataset
        if self.vision and (self.skip or isinstance(dataset, Mixture)):
            raise ConfigError(
                f"{name}: with a vision-language processor, sftrainer prepares each data set itself "
                "(mixtures and dataset_kwargs.skip_prepare_dataset are not supported for image data)"
            )
        if self.vision and isinstance(dataset, list):  # bytes / PIL images inside messages: see lift_images
            dataset = [lift_images(row) if isinstance(row, dict) else row for row in dataset]
        if isinstance(dataset, Mixture):
            if self.skip:
                raise ConfigError(
                    f"{name}: a mixture is sampled and prepared source by source; "
                    "dataset_kwargs.skip_prepare_dataset=true cannot use one"
                )
            with main_process_first(self.args, f"preparing {name}"):
                out = self._prepare(dataset, name, pack)
            self._prepared.append(out)
            return out
        # Once: the main process writes the datasets cache, the others then read it (every process
        # must call this, as every process builds the trainer).
        if not self.skip:
            _refuse_transform(dataset, name)
        with main_process_first(self.args, f"preparing {name}"):
            dataset = data_load.load(dataset, name)
            out = self._as_given(dataset, name) if self.skip else self._prepare(dataset, name, pack)
        self._prepared.append(out)
        return out

    def _as_given(self, dataset: Dataset | IterableDataset, name: str) -> Dataset | IterableDataset:
        columns = dataset.column_names or []
        masks = [c for c in LOSS_MASK_COLUMNS if c in columns]
        if masks and "labels" not in columns:
            # Labels are built from these masks during preparation, which is skipped: refuse rather
            # than silently train on every token (TRL 1.16 refuses the same).
            raise DataError(
                f"{name}: has {masks} but no 'labels', and dataset_kwargs.skip_prepare_dataset=true skips "
                "building labels from them. Add a 'labels' column (-100 on untrained tokens), or drop "
                "skip_prepare_dataset."
            )
        logger.info("%s: used as given (dataset_kwargs.skip_prepare_dataset=true)", name)
        return self._shuffle(dataset)

    def _prepare(
        self, dataset: Dataset | IterableDataset | Mixture, name: str, pack: bool
    ) -> Dataset | IterableDataset:
        args = self.args
        if pack and self.vision and isinstance(dataset, IterableDataset):
            raise ConfigError(
                f"{name}: packing a streamed image data set is not supported (each packed sequence must "
                "carry its rows' images); load it without streaming, or set packing=False "
                "(padding_free=True also avoids padding)"
            )
        settings = prepare_settings(args, pack)
        if isinstance(dataset, Mixture):
            prepared, self.data_stats[name] = self._prepare_mixture(dataset, name, settings)
        else:
            # The encoder is the strategy: the text one (None), or a processor's, which reads the rows'
            # images and carries them through the same prepare.
            encoder = None
            if self.vision:
                encoder = VisionTokenizer.for_settings(self.tokenizer, settings, args.image_root)
            else:
                _refuse_images(dataset, name)
            prepared, self.data_stats[name] = prepare(
                dataset, self.tokenizer, settings, name, self.formatting_func, encoder
            )
        self._note_differences(self.data_stats[name].format, pack)
        if isinstance(prepared, Dataset):
            first = prepared.select(range(min(FIRST_ROWS, len(prepared))))
            self.first_rows[name] = first.select_columns(["input_ids", "labels"]).to_list()
        if self.keep_rows:
            self.rows[name] = prepared
        if not pack:
            return self._shuffle(prepared)
        assert args.max_length is not None  # SFTConfig.problems refuses packing without max_length
        if isinstance(prepared, IterableDataset):
            logger.info(
                "%s: packed on the fly (streaming), %d rows at a time into sequences of <= %d tokens",
                name,
                STREAM_PACK_ROWS,
                args.max_length,
            )
            packer = StreamPacker(args.max_length, args.packing_strategy)
            packed = prepared.map(packer, batched=True, batch_size=STREAM_PACK_ROWS)
            return self._shuffle(packed)
        # Shuffled before packing too, so wrapped sequences do not hold neighbouring rows (as TRL).
        pack_rows = pack_with_images if self.vision else pack_dataset  # each sequence keeps its rows' images
        packed, stats = pack_rows(self._shuffle(prepared), args.max_length, args.packing_strategy)
        self.pack_stats[name] = stats
        truncated = self.data_stats[name].truncated
        logger.info(
            "%s%s",
            stats.summary(name),
            f"; {truncated} rows were truncated to max_length first" if truncated else "",
        )
        return self._shuffle(packed)

    def _prepare_mixture(
        self, mixture: Mixture, name: str, settings: DataSettings
    ) -> tuple[Dataset, PrepareStats]:
        """Each source sampled and prepared on its own; ``data_stats`` gets each source's counts too."""
        prepared, total, parts = prepare_mixture(
            mixture, self.tokenizer, settings, name, self.args.seed, self.formatting_func
        )
        self.source_stats[name] = parts
        for stats in parts:
            self.data_stats[stats.name] = stats
            self._note_differences(stats.format, False)
        return prepared, total

    def _note_differences(self, fmt: str, pack: bool) -> None:
        """Say once where the rows are prepared differently from TRL 1.16 (README: "Switching from TRL")."""
        notes = []
        args = self.args
        if (
            fmt.startswith(("messages", "sharegpt"))
            and args.train_on == "response"
            and not args.assistant_only_loss
        ):
            notes.append(
                "conversations train on assistant turns only (TRL trains every token unless "
                "assistant_only_loss=True; train_on='all' does that here)"
            )
        if pack and args.packing_strategy == "wrapped":
            notes.append(
                "wrapped packing keeps the rows in a sequence from attending to each other (TRL's does not)"
            )
        for note in notes:
            if note not in self._noted:
                self._noted.add(note)
                logger.info("Differs from TRL: %s", note)

    def _shuffle(self, dataset: Dataset | IterableDataset) -> Dataset | IterableDataset:
        if not (self.shuffle and self.args.shuffle_dataset):
            return dataset
        if isinstance(dataset, IterableDataset):
            return dataset.shuffle(seed=self.args.seed, buffer_size=SHUFFLE_BUFFER)
        return dataset.shuffle(seed=self.args.seed)


def _refuse_images(dataset: Any, name: str) -> None:
    """Image columns with a text tokenizer would be silently ignored: refused, as TRL does."""
    columns = [c for c in IMAGE_COLUMNS if c in (getattr(dataset, "column_names", None) or [])]
    if columns:
        raise DataError(
            f"{name}: the rows have an '{columns[0]}' column, and the model is not a vision-language model "
            "(its processing class is a tokenizer, not a processor). Use an image-text-to-text model "
            "(LLaVA, Idefics3, Gemma 3, ...) with its processor, or drop the images"
        )


def _refuse_transform(dataset: Any, name: str) -> None:
    """``DataError`` for a data set with a ``with_transform`` / ``set_transform`` transform: preparation
    reads the stored columns (``map``), so the transform would silently not apply."""
    if isinstance(dataset, Dataset) and dataset.format.get("type") == "custom":
        raise DataError(
            f"{name}: the data set has a transform set by Dataset.with_transform() (or set_transform), "
            "which runs only when rows are read, so preparing the data (tokenize, mask, pack) would not see "
            "it. Apply it with Dataset.map() instead, or set dataset_kwargs={'skip_prepare_dataset': True} "
            "and make the transform return trainer-ready rows (input_ids, and labels with -100 on "
            "untrained tokens), which the trainer then uses as they are read."
        )
