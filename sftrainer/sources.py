"""Where a run's data comes from: ``resolve_data(cfg)`` turns a run config's ``data:`` section into raw
train and eval data sets (loaded, columns renamed, split), before any tokenization.

Contract: the result is what ``DataPipeline`` (``sftrainer.pipeline``) takes; ``'builtin'`` names the demo
data files; a mixture comes back as a loaded ``Mixture``. Training (``sftrainer.train``), ``sftrainer data``
(``sftrainer.preview``) and ``sftrainer eval`` all read data through this one function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sftrainer import builtin
from sftrainer.data import load as data_load
from sftrainer.data.mixture import Mixture
from sftrainer.run_config import RunConfig


def resolve_data(cfg: RunConfig) -> tuple[Any, Any]:
    """Train and eval sources, with 'builtin' replaced by the demo data files.

    A mixture (data.train listing sources as mappings) comes back as a ``Mixture`` with every source
    loaded; the trainer samples and prepares it source by source.
    """
    train_src = cfg.data.train
    eval_src: str | Sequence[str | dict[str, Any]] | None = cfg.data.eval  # may become train_src
    if cfg.data.is_mixture():
        sources = [
            dataclasses.replace(s, data=str(builtin.data_files()[0])) if s.data == builtin.BUILTIN else s
            for s in cfg.data.mixture_sources()
        ]
        mixture = Mixture(sources, seed=cfg.train.seed).loaded("train data")
        eval_ds = None
        if eval_src is not None:
            eval_src = str(builtin.data_files()[1]) if eval_src == builtin.BUILTIN else eval_src
            eval_ds = data_load.load(
                eval_src, f"eval data ({data_load.describe(eval_src)})", split=cfg.data.eval_split_name
            )
            if cfg.data.columns:
                eval_ds = data_load.rename(eval_ds, cfg.data.columns, "eval data")
        return mixture, eval_ds
    if eval_src is None and cfg.data.eval_split_name is not None:
        eval_src = train_src  # another split of the same dataset
    if builtin.BUILTIN in (train_src, eval_src):
        train_file, eval_file = builtin.data_files()
        train_src = str(train_file) if train_src == builtin.BUILTIN else train_src
        eval_src = str(eval_file) if eval_src == builtin.BUILTIN else eval_src
    train_ds = data_load.load(
        train_src, f"train data ({data_load.describe(train_src)})", **cfg.data.hub_args()
    )
    eval_ds = None
    if eval_src is not None:
        eval_ds = data_load.load(
            eval_src, f"eval data ({data_load.describe(eval_src)})", **cfg.data.hub_args(eval=True)
        )
    elif cfg.data.eval_split > 0:
        train_ds, eval_ds = data_load.train_eval_split(train_ds, cfg.data.eval_split, cfg.train.seed)
    if cfg.data.columns:
        train_ds = data_load.rename(train_ds, cfg.data.columns, "train data")
        eval_ds = data_load.rename(eval_ds, cfg.data.columns, "eval data") if eval_ds is not None else None
    return train_ds, eval_ds
