"""A short training run, padded then packed, through ``sftrainer.train`` (tests/test_distributed.py runs it).

usage: python tests/dist_train.py MODEL_DIR DATA_FILE OUT_DIR BATCH_PER_PROCESS
   or: python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_train.py ...
   or: ... tests/dist_train.py fail raise|kill MODEL_DIR DATA_FILE OUT_DIR BATCH_PER_PROCESS

Writes OUT_DIR/padded and OUT_DIR/packed (each a run directory, checkpoints at steps 2 and 4), then
OUT_DIR/resumed: the padded run again, resumed from OUT_DIR/padded/checkpoint-2. Before training,
builds the built-in demo data in ``$SFTRAINER_HOME`` the way ``train`` does (main process first).

``fail``: the padded run into OUT_DIR, where the process of rank 1 dies at the end of step 2: it
raises an exception (``raise``) or kills itself with SIGKILL (``kill``, as the OOM killer would).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from sftrainer import builtin
from sftrainer.distributed import main_process_first
from sftrainer.run_config import build_config
from sftrainer.train import train
from sftrainer.trainer import SFTTrainer

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


class DieOnRank1(TrainerCallback):
    """The process of rank 1 dies once step 2 is done: ``how`` is 'raise' or 'kill'."""

    def __init__(self, how: str):
        self.how = how

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2 and args.process_index == 1:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("injected failure on rank 1 after step 2")


def fail(how: str, model_dir: str, data: str, out: str, batch: int) -> None:
    cfg = config(model_dir, data, out, batch, False)
    rows = [json.loads(line) for line in Path(data).read_text(encoding="utf-8").splitlines()]
    trainer = SFTTrainer(model=model_dir, args=cfg.train, train_dataset=rows, callbacks=[DieOnRank1(how)])
    trainer.train()
    trainer.save_model()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if sys.argv[1] == "fail":
        fail(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
        return
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
