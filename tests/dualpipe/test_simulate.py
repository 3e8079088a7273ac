"""Simulator: the published formulas where they apply, dependency-respecting timelines elsewhere."""

from __future__ import annotations

import random
import re

import pytest

from dualflow.dualpipe.schedule import Action, Overlap, dualpipe, generate, one_f_one_b, parts, zb1p
from dualflow.dualpipe.simulate import (
    Costs,
    formula_activations,
    formula_bubble,
    formula_scope,
    peak_activations,
    simulate,
)

SIZES = {
    "1f1b": [(P, m) for P in (1, 2, 3, 5, 8) for m in (P, P + 1, 2 * P, 3 * P + 2)],
    "zb1p": [(P, m) for P in (1, 2, 3, 5, 8) for m in (P, P + 1, 2 * P, 3 * P + 2)],
    "dualpipe": [(P, N) for P in (2, 4, 6, 8) for N in (2 * P, 2 * P + 2, 3 * P, 4 * P + 2)],
    "dualpipev": [(P, N) for P in (1, 2, 3, 4, 6) for N in (2 * P, 2 * P + 1, 3 * P + 2)],
}


def _costs_in_scope(kind: str, rng: random.Random) -> Costs:
    F = rng.choice([0.5, 1.0, 1.25, 2.0, 3.0]) * rng.uniform(0.8, 1.2)
    if kind == "1f1b":
        return Costs(F=F, B=rng.uniform(0.5, 4.0), W=rng.uniform(0.0, 0.5))
    if kind == "zb1p":
        I = rng.uniform(0.3, 3.0)
        W = rng.uniform(0.0, min(F, I))
        return Costs(F=F, B=I + W, W=W)
    W = rng.uniform(0.0, F)          # DualPipe's figure: I = F and W <= F
    B = F + W
    return Costs(F=F, B=B, W=W, FB=rng.choice([None, rng.uniform(max(F, B), F + B)]))


@pytest.mark.parametrize("kind", sorted(SIZES))
def test_published_formulas_hold_exactly_in_their_scope(kind):
    rng = random.Random(f"formulas-{kind}")
    for P, N in SIZES[kind]:
        schedule = generate(kind, P, N)
        PP = schedule.num_model_stages
        for _ in range(4):
            costs = _costs_in_scope(kind, rng)
            sim = simulate(schedule, costs)
            assert formula_scope(kind, schedule, costs) is None
            expected = formula_bubble(kind, PP, costs)
            assert sim.max_bubble == pytest.approx(expected, rel=1e-9, abs=1e-9), (kind, P, N, costs)
            assert max(sim.peak_activations) == formula_activations(kind, PP)
            assert set(sim.param_copies) == {2 if kind.startswith("dualpipe") else 1}


def test_formulas_with_the_report_costs():
    """The report's example sizes with F=1, B=2, W=1 (and F&B = F+B): numbers a reader can check by hand."""
    cases = {("1f1b", 8, 20): (21, 8), ("zb1p", 8, 20): (7, 8), ("dualpipe", 8, 20): (6, 9),
             ("dualpipev", 4, 20): (6, 9)}
    for (kind, P, N), (bubble, act) in cases.items():
        sim = simulate(generate(kind, P, N))
        assert (sim.max_bubble, max(sim.peak_activations)) == (bubble, act)


@pytest.mark.parametrize("kind,P,N,costs,reason", [
    ("zb1p", 6, 3, Costs(), "fewer micro-batches"),
    ("zb1p", 4, 8, Costs(F=0.5, B=2, W=1), "W <= F"),
    ("dualpipe", 4, 9, Costs(), "odd number"),
    ("dualpipe", 6, 8, Costs(), "fewer micro-batches"),
    ("dualpipe", 8, 20, Costs(F=1.3, B=2.1, W=0.7, FB=2.9), "B = F \\+ W"),
    ("dualpipev", 4, 6, Costs(), "fewer micro-batches"),
])
def test_outside_the_scope_the_simulation_and_formula_differ_and_the_reason_is_named(kind, P, N, costs, reason):
    s = generate(kind, P, N)
    sim = simulate(s, costs)
    assert sim.max_bubble != pytest.approx(formula_bubble(kind, s.num_model_stages, costs))
    assert formula_scope(kind, s, costs) is not None
    assert re.search(reason, formula_scope(kind, s, costs))


def test_fewer_microbatches_cost_extra_bubble_but_not_correctness():
    full = simulate(dualpipe(6, 12))
    few = simulate(dualpipe(6, 8))
    odd = simulate(dualpipe(6, 13))
    assert few.max_bubble > full.max_bubble and odd.max_bubble > full.max_bubble


def _check_timeline(sim, latency):
    s = sim.schedule
    end: dict[tuple, float] = {}
    for row in sim.timeline:
        for iv in row:
            for a in parts(iv.step):
                end[(a.kind, a.stage, a.microbatch)] = iv.end
    for r, row in enumerate(sim.timeline):
        last = 0.0
        for iv in row:
            assert iv.start >= last - 1e-12
            last = iv.end
            assert iv.end - iv.start == pytest.approx(sim.costs.duration(iv.step))
            for a in parts(iv.step):
                p, n = s.topology.prev[a.stage], s.topology.next[a.stage]
                deps = []
                if a.kind == "F" and p >= 0:
                    deps.append((("F", p, a.microbatch), s.placement[p]))
                if a.kind in ("B", "I"):
                    deps.append((("F", a.stage, a.microbatch), r))
                    if n >= 0:
                        key = ("B", n, a.microbatch) if ("B", n, a.microbatch) in end else ("I", n, a.microbatch)
                        deps.append((key, s.placement[n]))
                if a.kind == "W":
                    deps.append((("I", a.stage, a.microbatch), r))
                for key, where in deps:
                    assert iv.start >= end[key] + (latency if where != r else 0) - 1e-9, (iv, key)
    assert sim.makespan == max(row[-1].end for row in sim.timeline if row)


@pytest.mark.parametrize("kind,P,N", [("dualpipe", 6, 13), ("dualpipev", 3, 7), ("zb1p", 4, 3),
                                      ("interleaved", 3, 6), ("1f1b", 4, 9)])
def test_timeline_respects_every_dependency_with_per_stage_costs_and_latency(kind, P, N):
    s = generate(kind, P, N)
    rng = random.Random(kind)
    F = tuple(rng.uniform(0.5, 2) for _ in range(s.num_stages))
    W = tuple(rng.uniform(0.1, 0.5) for _ in range(s.num_stages))
    B = tuple(f + w + rng.uniform(0, 1) for f, w in zip(F, W))
    costs = Costs(F=F, B=B, W=W, latency=0.3)
    _check_timeline(simulate(s, costs), 0.3)


def test_latency_never_shortens_a_schedule_and_is_paid_on_the_critical_path():
    for kind, P, N in [("1f1b", 4, 8), ("dualpipe", 4, 8), ("dualpipev", 3, 6)]:
        spans = [simulate(generate(kind, P, N), Costs(latency=lat)).makespan for lat in (0, 0.1, 0.5, 1.0)]
        assert spans == sorted(spans) and spans[-1] > spans[0]
    # one forward and one backward hop per boundary at least: a single micro-batch through P stages
    sim = simulate(one_f_one_b(4, 1), Costs(F=1, B=2, latency=0.5))
    assert sim.makespan == pytest.approx(4 * (1 + 2) + 2 * 3 * 0.5)


def test_peak_activations_counts_until_w_and_inside_overlapped_pairs():
    F0, F1 = Action("F", 0, 0), Action("F", 0, 1)
    assert peak_activations([F0, Action("I", 0, 0), F1, Action("W", 0, 0)]) == 2
    assert peak_activations([F0, Overlap(F1, Action("B", 0, 0))]) == 2
    assert peak_activations([F0, Action("B", 0, 0), F1, Action("B", 0, 1)]) == 1
    assert max(simulate(zb1p(4, 8)).peak_activations) == 4


def test_costs_parse_and_check():
    c = Costs.parse("F=1, B=2.5, w=0.5, F&B=3, latency=0.1")
    assert (c.F, c.B, c.W, c.FB, c.latency) == (1.0, 2.5, 0.5, 3.0, 0.1)
    assert Costs.parse("") == Costs()
    with pytest.raises(ValueError, match="cannot parse cost 'X=1'"):
        Costs.parse("X=1")
    with pytest.raises(ValueError, match=r"costs.W \(3.0\) exceeds costs.B"):
        simulate(one_f_one_b(2, 2), Costs(W=3))
    with pytest.raises(ValueError, match="3 per-stage values; the schedule has 2 stages"):
        simulate(one_f_one_b(2, 2), Costs(F=(1, 1, 1)))
    assert Costs(F=1, B=2, W=1, FB=2.5).scaled(0.5) == Costs(F=0.5, B=1, W=0.5, FB=1.25)
