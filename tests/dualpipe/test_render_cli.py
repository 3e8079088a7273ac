"""Text grid, images, Chrome trace, and the ``dualflow schedule`` command."""

from __future__ import annotations

import json
import re

import pytest

from dualflow.cli import main
from dualflow.dualpipe.render import render_png, render_svg, render_text, to_chrome_trace
from dualflow.dualpipe.schedule import dualpipe, dualpipev, one_f_one_b
from dualflow.dualpipe.simulate import Costs, simulate


def test_text_grid_has_one_row_per_rank_and_one_cell_per_time_unit():
    sim = simulate(dualpipe(8, 20))
    text = render_text(sim)
    rows = [line for line in text.splitlines() if line.startswith("rank")]
    assert [r.split()[1] for r in rows] == [str(r) for r in range(8)]
    cells = [len(r[len("rank 0  "):]) for r in rows]
    assert max(cells) <= sim.makespan * 3  # labels up to "f9" plus a space: 3 characters per time unit
    # every step appears with its micro-batch; directions by case; overlapped pairs as X+y
    assert "F7+b3" in rows[0] and "f7+B3" in rows[7]
    for r, row in enumerate(sim.timeline):
        labels = re.findall(r"[FBIWfbiw]\d+(?:\+[FBIWfbiw]\d+)?", rows[r])
        assert len(labels) == len(row)
    assert "lower case toward rank 0" in text


def test_text_grid_marks_idle_time():
    text = render_text(one_f_one_b(4, 4))
    assert re.search(r"rank 3  \.  \.  \.  F0 B0", text)


def test_png_and_svg(tmp_path):
    png = render_png(dualpipe(4, 8), tmp_path / "s.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = render_svg(simulate(dualpipev(2, 4), Costs(FB=2.5)), tmp_path / "s.svg")
    content = svg.read_text()
    assert content.lstrip().startswith("<?xml") and "makespan" in content


def test_chrome_trace_has_one_track_per_rank_and_every_step():
    sim = simulate(dualpipe(4, 8), Costs(F=1, B=2, W=1, FB=2.5))
    trace = json.loads(json.dumps(to_chrome_trace(sim)))
    events = trace["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert names == {r: f"rank {r}" for r in range(4)}
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == sum(len(row) for row in sim.timeline)
    pairs = [e for e in slices if e["cat"] == "F&B"]
    assert pairs and all(e["dur"] == pytest.approx(2500.0) for e in pairs)


def test_cli_prints_grid_and_comparison(capsys, tmp_path):
    rc = main(["schedule", "--kind", "dualpipe", "--ranks", "8", "--microbatches", "20",
               "--png", str(tmp_path / "d.png"), "--trace", str(tmp_path / "t.json"),
               "--text", str(tmp_path / "s.txt")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "rank 7  f0 f1 f2" in out
    table = {line.split()[0]: line.split() for line in out.splitlines() if line.strip().split(" ")[0]
             in ("1f1b", "zb1p", "interleaved", "dualpipe", "dualpipev")}
    assert set(table) == {"1f1b", "zb1p", "interleaved", "dualpipe", "dualpipev"}
    # kind PP makespan bubble formula_bubble activations formula_activations params ...
    assert table["dualpipe"][1:8] == ["8", "66.00", "6.00", "6.00", "9", "9", "2"]
    assert table["1f1b"][3:5] == ["21.00", "21.00"]
    assert (tmp_path / "d.png").exists() and json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert (tmp_path / "s.txt").read_text().startswith("dualflow-schedule 1")


def test_cli_explains_impossible_sizes(capsys):
    assert main(["schedule", "--kind", "dualpipe", "--ranks", "5", "--microbatches", "10"]) == 2
    assert "num_ranks must be even" in capsys.readouterr().err
    assert main(["schedule", "--kind", "1f1b", "--ranks", "4", "--microbatches", "9", "--no-grid"]) == 0
    out = capsys.readouterr().out
    assert "not possible: interleaved" in out and "odd number of micro-batches" in out


@pytest.mark.parametrize("args, message", [
    (["--costs", "F=abc"], "dualflow schedule: --costs 'F=abc': cost 'F=abc': 'abc' is not a finite number >= 0"),
    (["--costs", "F=1,B=nan"], "--costs 'F=1,B=nan': cost 'B=nan': 'nan' is not a finite number >= 0"),
    (["--costs", "W=-1"], "--costs 'W=-1': cost 'W=-1': '-1' is not a finite number >= 0"),
    (["--costs", "X=1"], "--costs 'X=1': cannot parse cost 'X=1'; expected KEY=NUMBER with KEY one of F, B, W"),
])
def test_cli_names_the_costs_flag(capsys, args, message):
    assert main(["schedule", "--no-grid", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("flag", ["--ranks", "--microbatches", "--stages-per-rank"])
@pytest.mark.parametrize("value", ["0", "-1", "2.5", "x"])
def test_cli_sizes_must_be_positive_integers(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["schedule", "--no-grid", flag, value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"argument {flag}: expected a positive integer, got {value!r}" in err, err
