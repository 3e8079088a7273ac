"""The FP8 benchmarks run in their CPU smoke mode and record rows with the peers beside them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path, records: int = 1) -> dict | list[dict]:
    proc = subprocess.run([sys.executable, *args, "--smoke", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(got) == records
    return got[0] if records == 1 else got


@pytest.mark.slow
def test_fp8_gemm_smoke(tmp_path):
    rec = _run(["-m", "dualflow", "bench", "fp8_gemm"], tmp_path / "gemm.json")
    rows = rec["rows"]
    impls = {r["impl"] for r in rows}
    assert {"torch bf16 matmul", "torch block-scaled", "dualflow reference", "nn.Linear bf16"} <= impls
    fp8_rows = [r for r in rows if r["impl"].startswith(("dualflow", "Fp8Linear"))]
    assert fp8_rows and all(r["TFLOPS"] > 0 and r["error"] < 1e-3 for r in fp8_rows)
    assert {r["layout"] for r in rows} >= {"1x128.128x128", "1x128.1x128", "grouped contiguous", "linear fwd+bwd"}
    if rec["environment"]["device"].startswith("cpu"):
        assert "sm90" in rec["meta"]["unavailable"]["torch block-scaled"]


@pytest.mark.slow
def test_fp8_quant_smoke(tmp_path):
    activations, weights, swiglu = _run(["benchmarks/fp8_quant.py", "--weights", "--swiglu"], tmp_path / "quant.json",
                                        records=3)
    assert activations["benchmark"] == "fp8_quant" and weights["benchmark"] == "fp8_quant_weights"
    rows = activations["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"copy (bf16)", "quantize_1x128", "quantize_128x1", "quantize_1x128_and_128x1", "quantize_128x128"}
    assert all(r["GB/s"] > 0 for r in rows)
    rows = weights["rows"]
    assert {r["op"] for r in rows} == {"copy (fp32)", "quantize_128x128_transposed",
                                       "quantize_128x128 + transposing copy"}
    assert {r["weight"] for r in rows} == {"2x256x384", "1x128x256"} and all(r["GB/s"] > 0 for r in rows)
    assert swiglu["benchmark"] == "fp8_quant_swiglu"
    assert {(r["op"], r["backend"]) for r in swiglu["rows"]} == {
        ("copy (bf16 h)", "torch"), ("swiglu", "reference"), ("swiglu backward", "reference")}
    assert all(r["GB/s"] > 0 for r in swiglu["rows"])
