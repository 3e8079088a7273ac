"""A single-node SLURM cluster on 127.0.0.1, started from a generated slurm.conf in a temporary folder.

munged, slurmctld and slurmd run with their own sockets, free ports, spool/state folders and pid files
under ``root``, so several test runs on one machine do not collide. slurmd is told its node name with
``-N`` (it would otherwise match the container's arbitrary hostname against slurm.conf); the node is
called ``localhost`` so that the nodelist resolves everywhere. Also usable by hand:

    python -m tests.launcher.slurm_cluster start DIR    # prints `export SLURM_CONF=...`
    python -m tests.launcher.slurm_cluster stop DIR
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sinfo", "scontrol", "munge")
NODE = "localhost"
# Launcher and MPI variables that must not leak from the test run's own environment into srun's tasks.
_LEAKS = ("SLURM_", "OMPI_", "PMIX_", "PMI_", "MPI_LOCAL", "MV2_", "TORCHELASTIC_")
_TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def missing_programs() -> list[str]:
    return [p for p in DAEMONS + CLIENTS if shutil.which(p) is None]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without any launcher's variables (the tests may themselves run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKS) and k not in _TORCH_VARS}
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """Start with :meth:`start`, run commands with :attr:`env`, always :meth:`stop`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return clean_env(SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        user = getpass.getuser()
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text(f"""\
ClusterName=dualflow-test
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
# The test node claims more CPUs than a small CI machine has, so that several tasks fit on it.
SlurmdParameters=config_overrides
NodeName={NODE} NodeAddr=127.0.0.1 CPUs=16 State=UNKNOWN
PartitionName=test Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir(mode=0o711, exist_ok=True)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        subprocess.run(["munged", "--force", f"--socket={d}/munge.socket", f"--key-file={key}",
                        f"--log-file={d}/munged.log", f"--pid-file={d}/munged.pid", f"--seed-file={d}/munged.seed"],
                       check=True, capture_output=True, timeout=30)

    def start(self, timeout: float = 30.0) -> SlurmCluster:
        self._write_config()
        self._start_munge()
        env = self.env
        # -c: a clean start, no state recovered; -N: the node name, whatever the hostname is.
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], check=True, env=env, capture_output=True,
                       timeout=30)
        subprocess.run(["slurmd", "-c", "-f", str(self.conf), "-N", NODE], check=True, env=env,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            res = subprocess.run(["sinfo", "-h", "-n", NODE, "-o", "%T"], env=env, capture_output=True, text=True,
                                 timeout=30)
            state = res.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM test node did not come up in {timeout} s (state {state!r}); logs:\n"
                           + self.logs())

    def logs(self) -> str:
        parts = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} ---\n" + "\n".join(path.read_text().splitlines()[-20:]))
        return "\n".join(parts)

    def srun(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120,
             cwd: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["srun", *args], env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)

    def _step_daemons(self) -> list[int]:
        """slurmstepd processes of this cluster (they inherit slurmd's SLURM_CONF)."""
        mine = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if (proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"slurmstepd")
                        and mine in (proc / "environ").read_bytes().split(b"\0")):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Stop the daemons this cluster started (by their pid files) and wait for them to exit.

        Steps still finishing get a few seconds first; a step daemon left behind (it would retry its
        completion message to a stopped controller forever) is then stopped too.
        """
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(p) for p in self._step_daemons()):
            time.sleep(0.1)
        for pid in self._step_daemons():  # stuck: slurmstepd ignores SIGTERM
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pids = []
        for name in ("slurmd.pid", "slurmctld.pid", "munge/munged.pid"):
            path = self.root / name
            try:
                pids.append(int(path.read_text().split()[0]))
            except (OSError, ValueError, IndexError):
                continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for pid in pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("start", "stop"):
        sys.exit("usage: python -m tests.launcher.slurm_cluster start|stop DIR")
    cluster = SlurmCluster(Path(sys.argv[2]))
    if sys.argv[1] == "start":
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
    else:
        cluster.stop()
