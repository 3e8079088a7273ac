"""metrics.jsonl across a kill: a torn last line is dropped with a warning, other damage is an error, and
the rewrite at a resume is atomic."""

from __future__ import annotations

import io
import json
import os
import warnings

import pytest

from dualflow.train.metrics import MetricsLog
from dualflow.train.trainer import Trainer
from dualflow.utils import files
from tests.train.helpers import tiny

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _records(steps):
    return [{"step": s, "loss": 5.0 - 0.25 * s, "note": "ü"} for s in steps]


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail, encoding="utf-8")


def _log(run_dir):
    return MetricsLog(run_dir, total_steps=10, log_every=1, enabled=True, stream=io.StringIO())


@pytest.mark.parametrize("tail", ['{"step": 6, "loss": 3.', '{"step": 6, "lo\n', "\0\0\0\0"])
def test_a_torn_last_line_is_dropped_with_one_warning(tmp_path, tail):
    path = tmp_path / "metrics.jsonl"
    _write(path, _records(range(6)), tail)
    log = _log(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log.start(4)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and f"{path}: line 7 is cut short" in messages[0], messages
    assert log.records == _records(range(5))
    assert path.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in _records(range(5)))
    log.write({"step": 5, "loss": 1.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5]


def test_a_damaged_line_elsewhere_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _records(range(6)))
    lines = good.splitlines(keepends=True)
    damaged = "".join([*lines[:2], '{"step": 2, "lo\n', *lines[3:]])
    path.write_text(damaged)
    with pytest.raises(ValueError, match=rf"{path}: line 3 is not a JSON object"):
        _log(tmp_path).start(4)
    assert path.read_text() == damaged  # left as it was for the user to look at
    path.write_text(good + "[1, 2]\n" + json.dumps({"step": 6}) + "\n")  # JSON, but not a record
    with pytest.raises(ValueError, match="line 7 is not a JSON object"):
        _log(tmp_path).start(4)


def test_a_fresh_start_does_not_read_the_old_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1, "lo\n{"step": 2}\n')
    log = _log(tmp_path)
    log.start(0)
    assert log.records == [] and path.read_text() == ""


def test_the_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    _write(path, _records(range(6)))
    before = path.read_bytes()

    def replace_fails(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", replace_fails)
    with pytest.raises(OSError):
        _log(tmp_path).start(3)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_resume_after_a_kill_mid_append(tmp_path):
    cfg = tiny(tmp_path, train=dict(steps=3), checkpoint=dict(every=3))
    Trainer(cfg).train()
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as fh:  # what a kill during the append of step 4's record leaves
        fh.write('{"step": 4, "loss": 2.71')
    with pytest.warns(RuntimeWarning, match="line 5 is cut short"):
        summary = Trainer(tiny(tmp_path, train=dict(steps=4), checkpoint=dict(every=3))).train(resume=True)
    assert summary.resumed_from == 3
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[-1]["loss"] == summary.losses[4]
