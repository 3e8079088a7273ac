"""train.profile_step: one step of a real run under torch.profiler, summarised as text."""

from __future__ import annotations

import pytest

from dualflow.train.profile import _busy_us
from dualflow.train.trainer import Trainer
from tests.train.helpers import tiny


class _Span:
    def __init__(self, start, end):
        self.time_range = type("R", (), {"start": start, "end": end})()


def test_busy_time_counts_overlapping_kernels_once():
    spans = [_Span(0, 10), _Span(5, 12), _Span(20, 25), _Span(21, 22)]
    assert _busy_us(spans) == 12 + 5
    assert _busy_us([]) == 0


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_profiled_step_writes_its_summary(tmp_path):
    cfg = tiny(tmp_path, train=dict(steps=3, profile_step=2, profile_trace=True, val_every=3))
    Trainer(cfg).train()
    text = (tmp_path / "profile-rank0.txt").read_text()
    assert text.startswith("step wall time ") and "top operators by host time" in text
    assert "aten::" in text  # the step's operators, not an empty table
    assert (tmp_path / "profile-rank0.json").stat().st_size > 0
