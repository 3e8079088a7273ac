"""Runs one worker's program the way ``python SCRIPT`` / ``python -m MODULE`` would, under torchrun's
error recording: an uncaught exception is written to ``TORCHELASTIC_ERROR_FILE``, so the launcher's
failure report names the rank and shows its traceback even when the script has no ``@record``.

    python -m dualflow.launcher.worker SCRIPT [ARGS...]
    python -m dualflow.launcher.worker -m MODULE [ARGS...]

stderr is sent to stdout's file, so that one log per rank holds both, in order.
"""

from __future__ import annotations

import os
import runpy
import sys

from torch.distributed.elastic.multiprocessing.errors import record


@record
def _run(target: str, module: bool) -> None:
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path[0] = os.path.dirname(os.path.abspath(target))  # as `python SCRIPT` does
        runpy.run_path(target, run_name="__main__")


def main(argv: list[str]) -> None:
    module = argv[:1] == ["-m"]
    rest = argv[1:] if module else argv
    if not rest:
        sys.exit("usage: python -m dualflow.launcher.worker SCRIPT|-m MODULE [ARGS...]")
    sys.stdout.flush()
    os.dup2(sys.stdout.fileno(), sys.stderr.fileno())
    sys.argv = list(rest)
    _run(rest[0], module)


if __name__ == "__main__":
    main(sys.argv[1:])
