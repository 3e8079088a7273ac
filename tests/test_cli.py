import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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


def test_version_is_the_package_version():
    from importlib.metadata import version

    import dualflow

    for flag in ("--version", "-V"):
        assert _dualflow(flag).stdout == f"dualflow {dualflow.__version__}\n"
    assert dualflow.__version__ == version("dualflow")  # pyproject.toml's version, as installed


def test_bench_lists_the_scripts_of_the_checkout():
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert _dualflow("bench").stdout == f"benchmarks: {', '.join(scripts)}\n"
    res = _dualflow("bench", "nope", check=False)
    assert res.returncode == 2 and f"unknown benchmark 'nope'; available: {', '.join(scripts)}" in res.stderr


@pytest.mark.skipif(shutil.which("cmake") is None, reason="building the wheel needs cmake on PATH")
def test_an_installed_package_carries_its_benchmarks_and_configs(tmp_path):
    """A real (non-editable) wheel, installed into a folder and run without this checkout or the editable
    install on the path (``python -S``): ``dualflow bench`` finds the scripts and runs one."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "wheel"), "-C", "cmake.define.DUALFLOW_CUDA=OFF",
                            "-C", f"build-dir={tmp_path / 'build'}"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "wheel").glob("dualflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    scripts = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py"))
    assert {f"dualflow/benchmarks/{s}.py" for s in scripts} <= names
    assert {f"dualflow/configs/{p.name}" for p in (ROOT / "configs").glob("*.toml")} <= names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # torch and numpy from this environment; dualflow only from the installed folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])}

    script = ("import contextlib, dualflow, sys\n"
              "from dualflow.cli import main\n"
              "print(dualflow.__file__)\n"
              "main(['bench'])\n"
              "print('train:', main(['train']))\n"
              "with contextlib.suppress(SystemExit):\n"
              "    main(['bench', 'schedules', '--help'])\n")
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    where, listing, train, *help_text = proc.stdout.splitlines()
    assert where == str(target / "dualflow" / "__init__.py"), where
    assert listing == f"benchmarks: {', '.join(scripts)}", listing
    assert train == "train: 2" and str(target / "dualflow" / "configs" / "tiny_moe.toml") in proc.stderr, proc.stderr
    assert any(line.startswith("usage: schedules.py") for line in help_text), help_text  # the script ran from there
