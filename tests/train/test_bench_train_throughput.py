"""benchmarks/train_throughput.py: its summary of a metrics file, and a real smoke run of two variants."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_summary_leaves_the_warmup_out(tmp_path):
    lines = [{"step": 0, "val_loss": 5.0}]
    lines += [{"step": s, "loss": 5.0 - s / 10, "tokens_per_s": 100.0 if s <= 2 else 1000.0 + s,
               "step_time_s": 1.0 if s <= 2 else 0.1, "mfu": None if s % 2 else 0.25, "peak_memory_mb": 10.0 * s}
              for s in range(1, 8)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = _module().summarize(path, warmup=2)
    assert got["val_loss"] is None  # only the initial validation: no loss after training
    path.write_text(path.read_text() + json.dumps({"step": 7, "val_loss": 4.25}) + "\n")
    got = _module().summarize(path, warmup=2)
    assert got["val_loss"] == 4.25
    assert got["steps"] == 5  # steps 3..7
    assert got["tokens_per_s"] == 1005.0 and got["step_ms"] == pytest.approx(100.0)
    assert got["mfu"] == 0.25 and got["peak_mb"] == 70.0 and got["final_loss"] == pytest.approx(4.3)
    path.write_text(json.dumps({"step": 0, "val_loss": 5.0}) + "\n")
    with pytest.raises(ValueError, match="no training step"):
        _module().summarize(path, warmup=0)


def test_val_gap_is_relative_to_the_first_variant():
    gap = _module().val_gap
    assert gap(1.1366, 1.1644) == "-2.39%" and gap(1.17, 1.1644) == "+0.48%" and gap(2.0, 2.0) == "+0.00%"
    assert gap(None, 1.0) == gap(1.0, None) == "-"


def test_repeated_runs_are_compared_step_by_step():
    compare = _module().compare_losses
    assert compare([3.0, 2.5, 2.25], [3.0, 2.5, 2.25]) == "bit-identical over 3 steps"
    assert compare([3.0, 2.5, 2.25], [3.0, 2.5000000000000004, 2.25]) == (
        "first differs at step 2 (2.5 against 2.5000000000000004)")
    assert compare([3.0, 2.5], [3.0]) == "the same over 1 steps, then 2 against 1 steps"


@pytest.mark.slow
def test_smoke_run_of_two_variants(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run([sys.executable, "-m", "dualflow", "bench", "train_throughput", "--smoke", "--variants",
                           "base,fp8-serial,base", "--json", str(out), "--keep", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    rows = record["rows"]
    assert [r["variant"] for r in rows] == ["base", "fp8-serial", "base#2"]
    # a variant named again ran again, in its own directory, and the same run repeats its losses
    assert rows[2]["final loss"] == rows[0]["final loss"] and rows[2]["val loss"] == rows[0]["val loss"]
    assert rows[0]["val gap"] == rows[2]["val gap"] == "+0.00%" and rows[1]["val gap"].endswith("%")
    assert "base#2: training losses bit-identical over 4 steps against base" in proc.stdout
    assert record["meta"]["repeats"] == {"base#2": "bit-identical over 4 steps"}
    assert rows[0]["ratio"] == 1.0 and all(r["tokens/s"] > 0 and r["step ms"] > 0 for r in rows)
    assert "training throughput: tiny_moe.toml, 2 process(es)" in proc.stdout
    # each variant really ran with its overrides: FP8 layers converted only in the second
    logs = {name: (tmp_path / "runs" / name / "launch.log").read_text() for name in ("base", "fp8-serial")}
    assert "FP8:" not in logs["base"] and "FP8: " in logs["fp8-serial"]


def test_bad_variant_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--smoke",
                           "--variants", "turbo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown ['turbo']" in proc.stderr


def test_rounds_combine_into_one_row():
    combine = _module().combine_rounds
    runs = [{"steps": 5, "tokens_per_s": 100.0, "step_ms": 10.0, "mfu": 0.2, "peak_mb": 7.0, "final_loss": 3.0,
             "losses": [4.0, 3.0], "val_loss": 3.5},
            {"steps": 5, "tokens_per_s": 80.0, "step_ms": 12.5, "mfu": None, "peak_mb": 9.0, "final_loss": 3.1,
             "losses": [4.0, 3.1], "val_loss": 3.6},
            {"steps": 5, "tokens_per_s": 90.0, "step_ms": 11.0, "mfu": 0.3, "peak_mb": 8.0, "final_loss": 3.2,
             "losses": [4.0, 3.2], "val_loss": 3.7}]
    got = combine(runs)
    assert got["steps"] == 15 and got["tokens_per_s"] == 90.0 and got["step_ms"] == 11.0
    assert got["mfu"] == pytest.approx(0.25) and got["peak_mb"] == 9.0
    assert got["spread"] == pytest.approx(2.5 / 11.0)
    assert got["final_loss"] == 3.0 and got["val_loss"] == 3.5  # the first round's
    assert combine(runs[:1])["spread"] is None


@pytest.mark.slow
def test_smoke_rounds_interleave_the_variants(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--smoke", "--variants",
                           "base,fp8", "--rounds", "2", "--steps", "3", "--keep", str(tmp_path / "runs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order = [line.split("train_throughput: ")[1] for line in proc.stderr.splitlines()
             if line.startswith("train_throughput: ") and line.endswith(" ...")]
    assert order == ["base (round 1) ...", "fp8 (round 1) ...", "base (round 2) ...", "fp8 (round 2) ..."]
    runs = tmp_path / "runs"
    assert all((runs / v / f"round{r}" / "metrics.jsonl").is_file() for v in ("base", "fp8") for r in (1, 2))
    assert "base (round 2): training losses bit-identical over 3 steps against base" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.strip().startswith("base "))
    assert row.split()[1] == "4" and row.split()[5].endswith("%")  # 2 timed steps a round; the spread
