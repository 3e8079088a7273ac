import json
import subprocess
import sys

import torch


def _dualflow(*args, check=True):
    return subprocess.run([sys.executable, "-m", "dualflow", *args], capture_output=True, text=True,
                          check=check, timeout=120)


def test_info_runs_and_says_what_the_machine_is():
    out = _dualflow("info").stdout
    assert "torch" in out and torch.__version__ in out
    assert "libdualflow" in out and "backends" in out
    if not torch.cuda.is_available():
        assert "CPU-only" in out


def test_info_json():
    info = json.loads(_dualflow("info", "--json").stdout)
    assert info["distributed_backends"]["gloo"] is True
    assert info["cuda_available"] == torch.cuda.is_available()


def test_unknown_command_fails_with_the_list():
    res = _dualflow("frobnicate", check=False)
    assert res.returncode == 2 and "choose one of" in res.stderr


def test_help_lists_every_command():
    out = _dualflow("--help").stdout
    for name in ("info", "schedule", "launch", "doctor", "train", "bench"):
        assert name in out
