"""Several processes (``torchrun``, ``accelerate launch``): who goes first, and whether we were launched.

transformers and accelerate shard each batch across processes and reduce the gradients; what is
left to sftrainer is the work that writes shared files:

- ``main_process_first(args)``: data preparation and the built-in demo assets. The global main
  process runs the block first (it builds the caches); then the main process of each other node (its
  disk may not be shared); then everyone else, who find the caches built and read them.
- Output files (logs, checkpoints, run record, report, model card, final model) are written where
  ``args.should_save`` / ``is_world_process_zero()`` says so, in the modules that write them.
- How ``sftrainer train --nproc N`` starts the processes is ``sftrainer.launch``'s (the command layer).
- A process that dies ends the job: torchrun (and accelerate launch, which runs it) stops the
  others when one exits non-zero and prints which rank failed first ("Root Cause"). A process that
  hangs instead stalls the others in their next collective until ``ddp_timeout`` (transformers
  default 1800 s) ends them; transformers 5.25 does not pass ``ddp_timeout`` on with ``use_cpu: true``
  (such a job waits torch's default, also 30 minutes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

# Set by torchrun and accelerate launch in every process they start.
LAUNCHER_ENV = ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")


@contextlib.contextmanager
def main_process_first(args: Any, desc: str) -> Iterator[None]:
    """Run the block on the global main process, then each node's main process, then the rest.

    ``args`` is a ``TrainingArguments`` (its ``main_process_first`` sets up the process group). With
    one process this is a plain block.
    """
    with (
        args.main_process_first(local=False, desc=desc),
        args.main_process_first(local=True, desc=desc),
    ):
        yield


def is_launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return any(name in os.environ for name in LAUNCHER_ENV)
