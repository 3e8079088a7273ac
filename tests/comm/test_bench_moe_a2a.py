"""benchmarks/moe_a2a.py --smoke: runs on 2 gloo ranks and reports consistent units, and the bytes per token
that group-limited routing saves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_a2a.py"


def test_smoke_mode_runs_and_reports_busbw(tmp_path):
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--limit-groups", "1"],
                          capture_output=True, text=True, timeout=240)
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
    # group-limited routing beside the free top-k, bytes counted from the dispatch layout: two ranks, one
    # group of experts each, one group per token -> every token goes to exactly one rank
    row_bytes = 256 + 256 // 128 * 4  # the smoke setting's FP8 row: hidden 256 + one FP32 scale per 128
    for tokens in (16, 64):
        per = {r["routing"]: r for r in rows if r["backend"] == "torch" and r["op"] == "dispatch"
               and r["tokens"] == tokens}
        assert per["1 of 2 groups"]["bytes/token"] == row_bytes
        assert per["top-4"]["bytes/token"] > 1.5 * row_bytes  # top-4 of 16 reaches both ranks for most tokens
