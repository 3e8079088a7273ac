"""The benchmarks' --smoke modes run (the numbers themselves are for benchmarks/, not tests)."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_schedules_benchmark_smoke(tmp_path, capsys):
    main = runpy.run_path(str(BENCH / "schedules.py"))["main"]
    assert main(["--smoke", "--json", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "dualpipe" in out and "torch ScheduleDualPipeV" in out
    record = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert record["benchmark"] == "schedules" and {r["kind"] for r in record["rows"]} >= {"dualpipe", "zb1p"}
