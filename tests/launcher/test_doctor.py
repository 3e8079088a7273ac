"""`dualflow doctor` and the NVML layer: never crashing without GPUs, the verdicts, the NVLink matrix."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys

import pytest
import torch

from dualflow.cli import main as dualflow_main
from dualflow.launcher.doctor import Check, checks, collect, render
from dualflow.launcher.nvml import GpuTelemetry, Nvml, normalize_bus_id, nvlink_counts, visible_physical_indices
from tests.launcher.helpers import DUALFLOW, clean_env, run


def test_doctor_runs_and_reports_this_machine(capsys):
    assert dualflow_main(["doctor", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert info["limits"]["open_files"] == [None if v == resource.RLIM_INFINITY else v for v in (soft, hard)]
    assert info["limits"]["shm_bytes"] == (os.statvfs("/dev/shm").f_frsize * os.statvfs("/dev/shm").f_blocks)
    assert info["torch"] == torch.__version__ and info["launcher"].startswith(("single", "slurm", "torchrun"))
    assert all(c["level"] in ("ok", "info", "warn", "fail") for c in info["checks"])
    if not torch.cuda.is_available():
        assert {"level": "info", "subject": "gpus",
                "message": "no GPU visible: jobs run on the CPU with the gloo backend"} in info["checks"]


def test_doctor_command_never_crashes_even_in_a_broken_environment():
    # A malformed launcher variable is a failed check (exit 1), not a crash.
    code, out = run([*DUALFLOW, "doctor"], clean_env(RANK="x", WORLD_SIZE="2"), timeout=120)
    assert code == 1, out
    assert "[FAIL] launcher: unavailable (LauncherError: RANK='x': expected an integer >= 0" in out
    assert "Traceback" not in out and "limits       open files" in out


def _facts(**over):
    base = {"devices": [], "distributed_backends": {"gloo": True, "nccl": False}, "nvml": "ok",
            "limits": {"open_files": [1 << 20, 1 << 20], "locked_memory": [None, None], "shm_bytes": 8 << 30,
                       "infiniband": False},
            "launcher": "single: rank 0 of 1", "nccl_env": {}, "cuda_library": {"loadable": True}}
    base.update(over)
    return base


@pytest.mark.parametrize("facts, verdict", [
    (_facts(), Check("info", "gpus", "no GPU visible: jobs run on the CPU with the gloo backend")),
    (_facts(devices=[{"index": 0}]), Check("fail", "nccl", "GPUs are visible but this torch has no NCCL: install a "
                                                          "CUDA build of torch")),
    (_facts(limits={"open_files": [1024, 4096], "locked_memory": [None, None], "shm_bytes": 8 << 30,
                    "infiniband": False}), "open-file limit 1024 < 65536"),
    (_facts(limits={"open_files": [None, None], "locked_memory": [None, None], "shm_bytes": 64 << 20,
                    "infiniband": False}), "/dev/shm is 64 MiB < 1 GiB"),
    (_facts(devices=[{}], distributed_backends={"nccl": True}, limits={
        "open_files": [None, None], "locked_memory": [65536, 65536], "shm_bytes": 8 << 30, "infiniband": True}),
     "GPUDirect RDMA needs `ulimit -l unlimited`"),
    (_facts(devices=[{}], distributed_backends={"nccl": True}, nvml="NVMLError: x"), "NVML unusable (NVMLError: x)"),
    (_facts(topology=[["X", "SYS"], ["SYS", "X"]]), "no NVLink between the visible GPUs"),
    (_facts(nccl_env={"NCCL_NVLS_ENABLE": "1"}), "NCCL_NVLS_ENABLE=1: NVLink multicast on by your choice"),
    (_facts(launcher="unavailable (LauncherError: x)"), Check("fail", "launcher", "unavailable (LauncherError: x)")),
    (_facts(cuda_library={"loadable": False, "reason": "not built"}), "CUDA library not loadable: not built"),
])
def test_verdicts(facts, verdict):
    found = checks(facts)
    if isinstance(verdict, Check):
        assert verdict in found, found
    else:
        assert any(verdict in c.message and c.level in ("warn", "info", "fail") for c in found), found


def test_a_healthy_gpu_machine_has_no_warnings():
    facts = _facts(devices=[{}, {}], distributed_backends={"nccl": True}, nccl="2.27.5",
                   topology=[["X", "NV18"], ["NV18", "X"]])
    assert checks(facts) == [Check("ok", "gpus", "2 GPU(s), NCCL 2.27.5")]


UUIDS = ["GPU-aaaa1111", "GPU-bbbb2222", "GPU-aaab3333", "GPU-cccc4444"]


@pytest.mark.parametrize("visible, physical", [
    (None, [0, 1, 2, 3]),
    ("", []),
    ("2,0", [2, 0]),
    (" 3 , 1 ", [3, 1]),
    ("0,7,1", [0]),  # CUDA stops at the first entry that names no GPU
    ("1,1", [1]),  # and at a repeated one
    ("GPU-bbbb", [1]),
    ("GPU-cccc4444,0", [3, 0]),
    ("GPU-aaa", []),  # ambiguous prefix
    ("MIG-12345", []),
    ("-1", []),
])
def test_visible_physical_indices(visible, physical):
    assert visible_physical_indices(visible, UUIDS) == physical


def test_bus_ids_compare_across_paddings():
    assert normalize_bus_id("00000000:1B:00.0") == normalize_bus_id(b"0000:1b:00.0") == (0, 0x1B, "00.0")
    with pytest.raises(ValueError, match="bus id"):
        normalize_bus_id("1b:00.0")


BUS = [(0, b, "00.0") for b in (0x18, 0x2A, 0x3A, 0x5D)]


def test_nvlink_counts_through_nvswitch():
    # HGX H100: every GPU has 18 links, all to NVSwitches.
    counts = nvlink_counts([[("switch", None)] * 18] * 4, BUS)
    assert counts == [[0 if i == j else 18 for j in range(4)] for i in range(4)]


def test_nvlink_counts_direct_links_and_pcie_only():
    links = [
        [("gpu", BUS[1]), ("gpu", BUS[1]), ("gpu", BUS[2])],
        [("gpu", BUS[0]), ("gpu", BUS[0])],
        [("gpu", BUS[0]), ("gpu", (0, 0x99, "00.0"))],  # a link to a GPU this process does not see
        [],
    ]
    assert nvlink_counts(links, BUS) == [[0, 2, 1, 0], [2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_nvml_without_a_driver_answers_none():
    with Nvml() as nvml:
        if nvml.available:
            pytest.skip("NVML works here; this checks the machine without it")
        assert nvml.error and nvml.call("nvmlDeviceGetCount") is None
    telemetry = GpuTelemetry(0)
    assert telemetry.sample() == {} and GpuTelemetry(99).sample() == {}
    telemetry.close()


@pytest.mark.gpu
def test_telemetry_on_a_gpu():
    x = torch.ones(64 << 20, device="cuda")  # 256 MiB in use
    telemetry = GpuTelemetry(0)
    sample = telemetry.sample()
    assert {"temperature_c", "power_w", "memory_used_gib", "sm_clock_mhz"} <= set(sample), sample
    assert 0 < sample["temperature_c"] < 120 and sample["power_w"] > 0 and sample["memory_used_gib"] >= 0.25
    assert GpuTelemetry(torch.cuda.device_count()).sample() == {}  # no such device: empty, no error
    telemetry.close()
    del x


def _smi_topology() -> dict[tuple[int, int], str]:
    """nvidia-smi's matrix by physical index: {(i, j): 'NV18' | 'SYS' | ...}."""
    text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60).stdout
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [line.split() for line in text.splitlines() if line.strip()]
    header = [t for t in lines[0] if re.fullmatch(r"GPU\d+", t)]
    cells = {}
    for row in lines[1:]:
        if row and re.fullmatch(r"GPU\d+", row[0]):
            for j, name in enumerate(header):
                cells[(int(row[0][3:]), int(name[3:]))] = row[1 + j]
    return cells


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs nvidia-smi to compare against")
@pytest.mark.parametrize("visible", [None, "reversed"])
def test_nvlink_matrix_matches_nvidia_smi(visible):
    n = torch.cuda.device_count()
    env = clean_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if visible == "reversed":
        if n < 2:
            pytest.skip("needs two GPUs to reorder them")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in reversed(range(n)))
    probe = """
import json, os, torch
from dualflow.launcher.doctor import collect
from dualflow.launcher.nvml import Nvml, visible_handles
env = os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(str(i) for i in range(torch.cuda.device_count()))
with Nvml() as nvml:
    from_env = [i for i, _ in visible_handles(nvml, cuda_visible_devices=env)]  # without torch's UUIDs
uuids = [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
print(json.dumps({"info": collect(), "uuids": uuids, "from_env": from_env}, default=str))
"""
    res = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout.splitlines()[-1])
    info, gpus, topo = data["info"], data["info"]["nvml_gpus"], data["info"]["topology"]
    assert len(gpus) == len(topo) == n
    # Row i is CUDA device i: the same GPU as torch's device i.
    for g, uuid in zip(gpus, data["uuids"]):
        assert g["uuid"].removeprefix("GPU-") == uuid.removeprefix("GPU-")
    physical = [g["physical"] for g in gpus]
    assert data["from_env"] == physical  # reading CUDA_VISIBLE_DEVICES gives the same GPUs
    assert physical == (list(reversed(range(n))) if visible else list(range(n)))
    smi = _smi_topology()
    for i, gi in enumerate(gpus):
        for j, gj in enumerate(gpus):
            assert topo[i][j] == smi[(gi["physical"], gj["physical"])], (i, j, topo, smi)
    assert "nvlink/p2p" in render(info)


def test_render_shows_the_matrix_with_physical_indices():
    info = collect()
    info.update(nvml="ok", driver="580.1", cuda_driver="13.0", topology=[["X", "NV18"], ["NV18", "X"]],
                nvml_gpus=[{"index": 0, "physical": 3}, {"index": 1, "physical": 1}])
    lines = render(info).splitlines()
    assert "driver       580.1 (CUDA driver 13.0)" in lines
    at = next(i for i, line in enumerate(lines) if line.startswith("nvlink/p2p"))
    assert lines[at].split()[1:] == ["GPU0", "GPU1"]
    assert lines[at + 1].split() == ["GPU0", "(phys", "3)", "X", "NV18"]
    assert lines[at + 2].split() == ["GPU1", "(phys", "1)", "NV18", "X"]
    json.dumps(info, default=str)
