import json
import time

import pytest

from dualflow.utils.timing import Table, Timing, time_fn, time_fns, write_record


def test_time_fn_counts_warmup_and_repeats():
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, repeat=7)
    assert len(calls) == 9
    assert len(t.samples) == 7 and t.min <= t.median <= t.max


def test_time_fn_measures_the_call_not_the_setup():
    t = time_fn(lambda: time.sleep(0.01), setup=lambda: time.sleep(0.03), warmup=0, repeat=3)
    assert 0.009 < t.median < 0.03


def test_time_fn_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeat"):
        time_fn(lambda: None, repeat=0)



def test_time_fns_interleaves_the_runs_and_times_each_one():
    order = []
    fns = {"fast": lambda: order.append("fast"), "slow": lambda: (order.append("slow"), time.sleep(0.005))}
    t = time_fns(fns, warmup=1, repeat=4)
    assert order == ["fast", "slow"] * 5  # round-robin, warm-up included
    assert set(t) == {"fast", "slow"} and all(len(v.samples) == 4 for v in t.values())
    assert t["fast"].max < 0.004 < t["slow"].min

def test_spread():
    t = Timing(tuple([1.0] * 8 + [2.0, 3.0]))
    assert t.median == 1.0
    assert t.spread == pytest.approx(1.0)


def test_table_renders_aligned_columns():
    tab = Table(["shape", "TFLOPS"], title="gemm")
    tab.add(shape="4096x7168", TFLOPS=1234.5678)
    tab.add(shape="64", TFLOPS=0.000123)
    lines = tab.render().splitlines()
    assert lines[0] == "gemm"
    assert len({len(line) for line in lines[1:]}) == 1
    assert "1,235" in lines[3] and "0.000123" in lines[4]
    with pytest.raises(KeyError, match="unknown columns"):
        tab.add(bogus=1)


def test_write_record_appends_json_lines(tmp_path):
    path = tmp_path / "out" / "r.jsonl"
    write_record(path, "demo", [{"a": 1}], smoke=True)
    write_record(path, "demo", [{"a": 2}])
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["rows"][0]["a"] for r in recs] == [1, 2]
    assert recs[0]["meta"] == {"smoke": True}
    assert recs[0]["environment"]["torch"]
