"""``dualflow launch``'s engine: decide what to pass torchrun, then run torchrun's elastic agent in-process.

:func:`plan_launch` turns the flags and the environment into a :class:`LaunchPlan` (pure: nothing
starts); :func:`launch` hands the plan to ``torch.distributed.run`` (its argument parser, its
``config_from_args`` and its ``elastic_launch``), with :class:`~dualflow.launcher.logs.RankLogsSpecs`
routing the workers' output.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dualflow.launcher.env import LauncherError, Site, detect_site, recommended_env

CPU_NPROC_DEFAULT = 4  # gloo workers per node when no GPU is visible (capped by the core count)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything ``dualflow launch`` will do, before it does it."""

    site: Site
    nproc_per_node: int
    nproc_reason: str
    torchrun_args: tuple[str, ...]  # arguments of `python -m torch.distributed.run`
    env: Mapping[str, str]  # added to the agent's and the workers' environment
    log_dir: Path
    differs: tuple[str, ...]  # user settings kept although they differ from the recommendation

    def command(self) -> str:
        return shlex.join([sys.executable, "-m", "torch.distributed.run", *self.torchrun_args])

    def summary(self) -> str:
        return (f"dualflow launch: {self.site.description}; {self.nproc_per_node} process(es) per node "
                f"({self.nproc_reason}); logs in {self.log_dir}")


def _nproc(value: str | int) -> tuple[int, str]:
    if str(value) != "auto":
        try:
            n = int(value)
        except ValueError:
            raise LauncherError(f"--nproc-per-node must be a positive integer or 'auto', got {value!r}") from None
        if n < 1:
            raise LauncherError(f"--nproc-per-node must be >= 1, got {n}")
        return n, "as requested"
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        return gpus, f"auto: {gpus} visible GPU(s)"
    n = max(1, min(CPU_NPROC_DEFAULT, os.cpu_count() or 1))
    return n, "auto: no GPU visible, gloo workers on the CPU"


def _check_endpoint(endpoint: str) -> None:
    """``HOST`` or ``HOST:PORT`` with a port from 1 to 65535 (torchrun's default port when there is none)."""
    host, sep, port = endpoint.rpartition(":") if ":" in endpoint else (endpoint, "", "")
    if not host.strip() or (sep and not (port.isdigit() and 1 <= int(port) <= 65535)):
        raise LauncherError(f"--rdzv-endpoint {endpoint!r}: expected HOST:PORT (an address of the first node and a "
                            "port from 1 to 65535, e.g. node0:29400)")


def _default_log_dir(site: Site) -> Path:
    if site.kind == "slurm":
        name = site.rdzv_id  # the same on every node, so a shared file system gathers one folder
    else:
        name = time.strftime("launch-%Y%m%d-%H%M%S")
    return Path("runs") / name


def plan_launch(
    target: Sequence[str],
    nproc_per_node: str | int = "auto",
    nnodes: int | None = None,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    log_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> LaunchPlan:
    """What to run: ``target`` is ``[SCRIPT, ARGS...]`` or ``["-m", MODULE, ARGS...]``."""
    environ = os.environ if environ is None else environ
    target = list(target)
    if not target or target == ["-m"]:
        raise LauncherError("nothing to launch: give a script or -m MODULE after `--`, "
                            "e.g. `dualflow launch --nproc-per-node 8 -- train.py --config cfg.toml`")
    if max_restarts < 0:
        raise LauncherError(f"--max-restarts must be >= 0, got {max_restarts}")
    if nnodes is not None and nnodes < 1:
        raise LauncherError(f"--nnodes must be >= 1, got {nnodes}")
    if rdzv_endpoint is not None:
        _check_endpoint(rdzv_endpoint)
    site = detect_site(environ, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint)
    nproc, reason = _nproc(nproc_per_node)
    logs = Path(log_dir) if log_dir is not None else _default_log_dir(site)
    logs = logs.absolute()

    add, differs = recommended_env(environ, str(logs))
    env = {**add, "DUALFLOW_LOG_DIR": str(logs), "DUALFLOW_LAUNCH": "1"}
    if max_restarts > 0 and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in environ:
        # With the rendezvous store shared, a restarted worker group reuses the previous attempt's keys and
        # can connect to a dead peer's address (pytorch/pytorch#135712); a store per attempt avoids that.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    if "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE" not in environ:
        env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] = "[rank${rank}]:"

    if site.rdzv_endpoint is None:
        nodes = ["--standalone", "--nnodes", "1"]
    else:
        nodes = ["--nnodes", str(site.nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", site.rdzv_endpoint,
                 "--rdzv-id", site.rdzv_id]
    args = [*nodes, "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
            "--log-dir", str(logs), "--logs-specs", "dualflow", "-m", "dualflow.launcher.worker", *target]
    return LaunchPlan(site, nproc, reason, tuple(args), env, logs, tuple(differs))


@contextlib.contextmanager
def _environ(extra: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def launch(plan: LaunchPlan) -> int:
    """Run the plan through torchrun's elastic agent; the exit status of the job (0 when every rank succeeded)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    from dualflow.launcher.logs import RankLogsSpecs

    plan.log_dir.mkdir(parents=True, exist_ok=True)
    with _environ(plan.env):
        args = torchrun.parse_args(list(plan.torchrun_args))
        if args.standalone:  # what torchrun's run() does for --standalone
            args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id = "c10d", "localhost:0", str(uuid.uuid4())
        args.logs_specs = None  # the class is given directly: no entry-point lookup needed
        config, entrypoint, entry_args = torchrun.config_from_args(args)
        config.logs_specs = RankLogsSpecs(log_dir=args.log_dir)
        try:
            elastic_launch(config, entrypoint)(*entry_args)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            print(exc.format_msg(), file=sys.stderr, flush=True)
            print(f"dualflow launch: rank {rank} failed (exit code {failure.exitcode}); its full output is in "
                  f"{plan.log_dir / f'rank-{rank}.log'}", file=sys.stderr, flush=True)
            return 1
        except SignalException as exc:
            print(f"dualflow launch: stopped by signal {exc.sigval.name}", file=sys.stderr, flush=True)
            return 128 + int(exc.sigval)
    return 0
