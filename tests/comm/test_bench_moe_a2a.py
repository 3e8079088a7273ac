"""benchmarks/moe_a2a.py --smoke: runs on 2 gloo ranks and reports consistent units."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_a2a.py"


def test_smoke_mode_runs_and_reports_busbw(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "busbw GB/s" in proc.stdout and "gloo a2a" in proc.stdout
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["meta"]["world"] == 2
    rows = record["rows"]
    assert {(r["backend"], r["op"]) for r in rows} >= {("torch", "dispatch"), ("torch", "combine"),
                                                       ("torch", "dispatch cached"), ("gloo a2a", "dispatch")}
    for r in rows:
        assert r["us"] > 0 and r["algbw GB/s"] > 0
        assert abs(r["busbw GB/s"] - r["algbw GB/s"] / 2) < 1e-9  # (n-1)/n with n = 2
        assert 0 < r["remote GB/s"] <= r["algbw GB/s"]
