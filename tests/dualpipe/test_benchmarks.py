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


def _pipeline_smoke(rank: int, world: int) -> list[dict]:
    import argparse

    bench = runpy.run_path(str(BENCH / "pipeline.py"))
    args = argparse.Namespace(smoke=True, ranks=world, microbatches=4, microbatch_size=2, hidden=16, f_ms=0.5,
                              i_ms=0.5, w_ms=0.5, gpu_hidden=0, gpu_tokens=0, repeat=1, device="cpu", json=None)
    return bench["worker"](rank, world, args)


def test_pipeline_benchmark_smoke():
    from tests.dist import run_workers

    rows = run_workers(_pipeline_smoke, 2, timeout=240)[0]
    got = {(r["workload"], r["runtime"], r["schedule"]) for r in rows}
    for workload in ("tiny", "timed"):
        for runtime, kind in [("dualflow", k) for k in ("dualpipe", "dualpipev", "1f1b", "zb1p")] + \
                             [("torch", "dualpipev"), ("torch", "1f1b")]:
            assert (workload, runtime, kind) in got
    tiny = {(r["runtime"], r["schedule"]): r for r in rows if r["workload"] == "tiny"}
    assert tiny[("dualflow / torch", "dualpipev")]["us_per_action"] > 0
    timed = [r for r in rows if r["workload"] == "timed"]
    assert all(r["step_ms"] > 0 and r["sim_bubble_ms"] >= 0 for r in timed)
