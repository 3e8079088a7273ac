"""A worker for the fault test: ``dualflow train`` whose rank 1 kills itself (SIGKILL) right after the
checkpoint of step ``$DUALFLOW_TEST_KILL_AFTER`` is complete, in the first attempt only."""

from __future__ import annotations

import os
import signal
import sys

import torch

from dualflow.cli import main
from dualflow.train.trainer import Trainer

KILL_AFTER = int(os.environ["DUALFLOW_TEST_KILL_AFTER"])
_save = Trainer.save


def _save_then_die(self):
    path = _save(self)
    first_attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
    if first_attempt and self.topo.rank == 1 and self.step == KILL_AFTER:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)
    Trainer.save = _save_then_die
    sys.exit(main(["train", *sys.argv[1:]]))
