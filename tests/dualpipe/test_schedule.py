"""Schedule IR and generators: text round trips, torch equivalence, structure, invalid sizes."""

from __future__ import annotations

import inspect

import pytest

from dualflow.dualpipe.comms import add_communication
from dualflow.dualpipe.schedule import (
    GENERATORS,
    Action,
    Overlap,
    Schedule,
    dualpipe,
    dualpipev,
    generate,
    interleaved_1f1b,
    parse_torch,
    parts,
)
from dualflow.dualpipe.validate import validate

SIZES = [(1, 1), (1, 4), (2, 2), (2, 5), (3, 6), (4, 8), (4, 9), (6, 12), (8, 20)]


def _torch_orders(name: str, ranks: int, microbatches: int, stages_per_rank: int | None = None):
    """Per-rank compute orders from torch's private visualizer, failing clearly if that API changed."""
    try:
        from torch.distributed.pipelining import _schedule_visualizer as vis

        params = list(inspect.signature(vis.get_schedule_ops).parameters)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"torch.distributed.pipelining._schedule_visualizer.get_schedule_ops is gone ({exc}); "
                    "this private API is what the equivalence test compares against: update the test")
    if params[:4] != ["schedule", "pp_degree", "num_microbatches", "num_stages_per_rank"]:
        pytest.fail(f"get_schedule_ops(schedule, pp_degree, num_microbatches, num_stages_per_rank) changed its "
                    f"signature to {params}; update _torch_orders")
    try:
        ops = vis.get_schedule_ops(name, ranks, microbatches, stages_per_rank)
        return parse_torch(ops)
    except ValueError as exc:
        if "cannot parse action" in str(exc) or "must pair" in str(exc):
            pytest.fail(f"torch's action notation changed; cannot read {name} ops: {exc}")
        raise


def _restage(steps, f):
    """Steps with every stage s renamed to f(s)."""
    def one(a: Action) -> Action:
        return Action(a.kind, f(a.stage), a.microbatch)
    return tuple(Overlap(one(x.forward), one(x.backward)) if type(x) is Overlap else one(x) for x in steps)


def _all_schedules():
    for gen in GENERATORS.values():
        for P, N in SIZES:
            try:
                yield gen(P, N)
            except ValueError:
                continue


def test_every_generated_schedule_is_valid_and_round_trips():
    count = 0
    for s in _all_schedules():
        validate(s)
        assert Schedule.from_text(s.to_text()) == s
        assert parse_torch(s.to_torch()) == s.actions
        annotated = add_communication(s)
        assert Schedule.from_text(annotated.to_text()) == annotated
        count += 1
    assert count >= 35


def test_text_form_is_compact_and_readable():
    text = dualpipe(4, 8).to_text()
    lines = text.splitlines()
    assert lines[0] == "dualflow-schedule 1"
    assert "chains: 0 1 2 3 | 4 5 6 7" in lines
    assert lines[-1].startswith("rank 3: ")
    assert "&" in text  # overlapped pairs
    with pytest.raises(ValueError, match="cannot parse action"):
        Schedule.from_text(text.replace("0F0", "0X0", 1))
    with pytest.raises(ValueError, match="first line"):
        Schedule.from_text("hello\n")


@pytest.mark.parametrize("ranks", range(1, 9))
def test_dualpipev_matches_torch_schedule_dualpipev(ranks):
    for microbatches in sorted({2 * ranks, 2 * ranks + 1, 2 * ranks + 2, 3 * ranks + 1, 4 * ranks + 3}):
        ours = dualpipev(ranks, microbatches).actions
        theirs = _torch_orders("DualPipeV", ranks, microbatches)
        for r in range(ranks):
            assert ours[r] == theirs[r], (f"rank {r} of DualPipeV({ranks}, {microbatches}) differs from torch:\n"
                                          f"ours:  {' '.join(map(str, ours[r]))}\n"
                                          f"torch: {' '.join(map(str, theirs[r]))}")


@pytest.mark.parametrize("ranks,microbatches", [(2, 4), (2, 6), (3, 3), (3, 9), (4, 8), (4, 12), (4, 10)])
def test_interleaved_matches_torch_interleaved_1f1b(ranks, microbatches):
    assert interleaved_1f1b(ranks, microbatches, 2).actions == _torch_orders("Interleaved1F1B", ranks, microbatches, 2)


def test_dualpipe_halves_are_torch_dualpipev_on_half_the_ranks():
    """DualPipeV is DualPipe cut in half: each half of DualPipe's ranks runs torch's DualPipeV order for P/2
    ranks and N/2 micro-batches, with DualPipe's stages renamed onto the V."""
    for P, N in [(2, 4), (4, 8), (4, 14), (6, 12), (8, 20)]:
        h = P // 2
        v = _torch_orders("DualPipeV", h, N // 2)
        s = dualpipe(P, N)
        for r in range(P):
            half = min(r, P - 1 - r)
            near, far = (r, 2 * P - 1 - r) if r < h else (2 * P - 1 - r, r)  # entering / returning stage
            rename = {near: half, far: 2 * h - 1 - half}
            assert _restage(s.actions[r], rename.__getitem__) == v[half], f"DualPipe({P}, {N}) rank {r}"


def test_dualpipe_is_mirror_symmetric():
    """Rank r of one direction does what rank P-1-r does in the other."""
    for P, N in [(2, 4), (4, 8), (6, 13), (8, 20)]:
        s = dualpipe(P, N)
        if N % 2:
            continue

        for r in range(P):
            assert s.actions[r] == _restage(s.actions[P - 1 - r], lambda st, P=P: (st + P) % (2 * P))


def test_dualpipe_placement_and_phases():
    P, N = 8, 20
    s = dualpipe(P, N)
    assert s.microbatches == (10, 10)
    for r in range(P):
        # rank r holds model stage r of one direction and model stage P-1-r of the other
        assert sorted(s.topology.position[st] for st in s.stages_of(r)) == sorted([r, P - 1 - r])
        kinds = [step.kind for step in s.actions[r]]
        assert kinds.count("F&B") > 0 and "I" in kinds and "W" in kinds
    # the first half of the batch enters at rank 0, the second half at rank P-1
    assert s.actions[0][0] == Action("F", 0, 0) and s.actions[P - 1][0] == Action("F", P, 0)
    # the middle ranks start their steady phase with an F and a B that are not overlapped
    for r in (P // 2 - 1, P // 2):
        i = next(i for i, st in enumerate(s.actions[r]) if type(st) is Overlap)
        assert [st.kind for st in s.actions[r][i - 2:i]] == ["F", "B"]


@pytest.mark.parametrize("P,N", [(4, 9), (4, 5), (4, 2), (6, 7), (8, 3), (2, 3)])
def test_dualpipe_odd_and_few_microbatches_stay_correct(P, N):
    s = dualpipe(P, N)
    validate(s)
    assert s.microbatches == ((N + 1) // 2, N // 2)
    done = [a for row in s.actions for st in row for a in parts(st) if a.kind == "F"]
    assert len(done) == N * P  # every micro-batch through every model stage once


def test_dualpipev_with_few_microbatches():
    for P, N in [(4, 1), (4, 5), (3, 2)]:
        s = dualpipev(P, N)
        validate(s)
        assert s.microbatches == (N,)


@pytest.mark.parametrize("call,match", [
    (lambda: dualpipe(7, 20), r"even.*nearest valid values: 6, 8"),
    (lambda: dualpipe(4, 1), r">= 2"),
    (lambda: interleaved_1f1b(4, 9, 2), r"multiple of the number of rounds.*nearest valid values: 8, 10"),
    (lambda: generate("gpipe", 4, 8), r"unknown schedule kind 'gpipe'; choose one of"),
    (lambda: generate("1f1b", 0, 8), r"num_ranks must be a positive int, got 0"),
    (lambda: generate("zb1p", 4, 2.5), r"num_microbatches must be a positive int"),
])
def test_impossible_sizes_raise_value_error_naming_the_constraint(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_zb1p_defers_rank_many_weight_gradients():
    s = generate("zb1p", 4, 8)
    for r, row in enumerate(s.actions):
        tail = []
        for st in reversed(row):
            if st.kind != "W":
                break
            tail.append(st)
        assert len(tail) == r + 1  # r deferred W's plus the W of the last I
