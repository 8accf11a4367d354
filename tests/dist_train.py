"""A short training run, padded then packed, through ``sftrainer.train`` (tests/test_distributed.py runs it).

usage: python tests/dist_train.py MODEL_DIR DATA_FILE OUT_DIR BATCH_PER_PROCESS
   or: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_train.py ...

Writes OUT_DIR/padded and OUT_DIR/packed (each a run directory, checkpoints at steps 2 and 4), then
OUT_DIR/resumed: the padded run again, resumed from OUT_DIR/padded/checkpoint-2. Before training,
builds the built-in demo data in ``$SFTRAINER_HOME`` the way ``train`` does (main process first).
"""

from __future__ import annotations

import logging
import sys

from sftrainer import builtin
from sftrainer.distributed import main_process_first
from sftrainer.run_config import build_config
from sftrainer.train import train

STEPS = 4


def config(
    model_dir: str, data: str, out: str, batch: int, packing: bool, resume: str | None = None
) -> object:
    return build_config(
        {
            "model": {"name_or_path": model_dir},
            "data": {"train": data},
            "output_dir": out,
            "packing": packing,
            "max_length": 64,
            "per_device_train_batch_size": batch,
            "max_steps": STEPS,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
            "save_strategy": "steps",
            "save_steps": 2,
            "report_to": "none",
            "disable_tqdm": True,
            "seed": 0,
            "use_cpu": True,
            "resume_from_checkpoint": resume,
        }
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model_dir, data, out, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    runs = {
        name: config(model_dir, data, f"{out}/{name}", batch, name == "packed")
        for name in ("padded", "packed")
    }
    with main_process_first(runs["padded"].train, "building the demo data"):
        builtin.data_files()
    for cfg in runs.values():
        train(cfg)
    train(config(model_dir, data, f"{out}/resumed", batch, False, resume=f"{out}/padded/checkpoint-2"))


if __name__ == "__main__":
    main()
