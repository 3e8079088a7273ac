"""The validator catches planted mistakes and names the first offending action."""

from __future__ import annotations

import pytest

from dualflow.dualpipe.comms import add_communication
from dualflow.dualpipe.schedule import Action, dualpipe, dualpipev, one_f_one_b, zb1p
from dualflow.dualpipe.validate import ScheduleError, validate


def _rows(schedule):
    return [list(r) for r in schedule.actions]


def _index(row, kind, stage=None):
    return next(i for i, a in enumerate(row)
                if type(a) is Action and a.kind == kind and (stage is None or a.stage == stage))


def test_missing_w_is_reported_at_its_i():
    s = dualpipe(4, 8)
    rows = _rows(s)
    i = _index(rows[1], "W")
    w = rows[1].pop(i)
    with pytest.raises(ScheduleError, match=rf"rank 1 step \d+ \({w.stage}I{w.microbatch}\): I of stage {w.stage} "
                                            rf"micro-batch {w.microbatch} is never followed by its W"):
        validate(s.replace_actions(rows))


def test_duplicated_forward_is_reported():
    s = zb1p(4, 8)
    rows = _rows(s)
    rows[2].insert(5, rows[2][1])
    with pytest.raises(ScheduleError, match=r"rank 2 step 5 \(2F1\): F of stage 2 micro-batch 1 duplicates the work "
                                            r"of rank 2 step 1"):
        validate(s.replace_actions(rows))


def test_swapped_send_order_is_reported():
    s = add_communication(dualpipev(3, 8))
    rows = _rows(s)
    sends = [i for i, a in enumerate(rows[0]) if type(a) is Action and a.kind == "SEND_F" and a.stage == 0]
    rows[0][sends[1]], rows[0][sends[2]] = rows[0][sends[2]], rows[0][sends[1]]
    with pytest.raises(ScheduleError, match=r"rank 0 step \d+ \(0SEND_F2\): send #1 on the activation channel rank "
                                            r"0 -> 1 carries \('F', 0, 2\) but receive #1 .* expects \('F', 0, 1\)"):
        validate(s.replace_actions(rows))


def test_explicit_communication_of_a_generated_schedule_is_valid():
    for s in (dualpipe(4, 10), dualpipev(4, 9), one_f_one_b(3, 5)):
        validate(add_communication(s))


def test_missing_receive_and_unreceived_send():
    s = add_communication(one_f_one_b(2, 3))
    rows = _rows(s)
    del rows[1][max(i for i, a in enumerate(rows[1]) if a.kind == "RECV_F")]  # the last activation receive
    with pytest.raises(ScheduleError, match=r"send #2 on the activation channel rank 0 -> 1 is never received"):
        validate(s.replace_actions(rows))


def test_circular_wait_names_ranks_and_actions():
    s = one_f_one_b(3, 3)
    rows = _rows(s)
    rows[0] = [Action(k, 0, m) for m in range(3) for k in ("F", "B")]  # rank 0 waits for B0 before sending F1
    rows[1] = [Action("F", 1, 0), Action("F", 1, 1), Action("B", 1, 0), Action("F", 1, 2), Action("B", 1, 1),
               Action("B", 1, 2)]
    with pytest.raises(ScheduleError) as info:
        validate(s.replace_actions(rows))
    msg = str(info.value)
    assert msg.startswith("deadlock: circular wait among ranks 0, 1")
    assert "rank 0 step 1 (0B0) waits for the backward of stage 1 micro-batch 0 from rank 1" in msg
    assert "rank 1 step 1 (1F1) waits for the forward of stage 0 micro-batch 1 from rank 0" in msg


def test_same_rank_order_mistakes():
    s = dualpipev(2, 4)
    rows = _rows(s)
    i, j = _index(rows[1], "F", 2), _index(rows[1], "F", 1)  # stage 2 needs stage 1's output on the same rank
    rows[1][i], rows[1][j] = rows[1][j], rows[1][i]
    with pytest.raises(ScheduleError, match=r"deadlock: circular wait among ranks 1:\n  rank 1 step \d+ \(2F0\) waits "
                                            r"for the forward of stage 1 micro-batch 0 from rank 1"):
        validate(s.replace_actions(rows))
    rows = _rows(s)
    i = _index(rows[0], "W")
    rows[0].insert(0, rows[0].pop(i))
    with pytest.raises(ScheduleError, match=r"rank 0 step 0 \(\dW0\): W before the I of stage \d micro-batch 0"):
        validate(s.replace_actions(rows))


def test_misplaced_and_nonexistent_steps():
    s = one_f_one_b(2, 2)
    rows = _rows(s)
    rows[0][0] = Action("F", 1, 0)
    with pytest.raises(ScheduleError, match=r"rank 0 step 0 \(1F0\): stage 1 lives on rank 1"):
        validate(s.replace_actions(rows))
    rows = _rows(s)
    rows[1][0] = Action("F", 1, 5)
    with pytest.raises(ScheduleError, match=r"micro-batch 5 does not exist"):
        validate(s.replace_actions(rows))
    rows = _rows(s)
    rows[0].append(Action("RECV_F", 0, 0))
    with pytest.raises(ValueError, match=r"stage 0 is the first stage of its chain"):
        validate(s.replace_actions(rows))
