"""The pipeline runtime on real processes (gloo) against the sequential single-process reference.

Losses and outputs are compared bit for bit in float32, gradients with DeepSeek's metric
1 - 2 sum(xy) / sum(x^2 + y^2) < 1e-13, measured peak activations with the simulator's prediction.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.dist import run_workers
from tests.dualpipe.pipeline_case import (
    check_many,
    expert_parallel_pipelines,
    invalid_use,
    layout_changes,
    run_many,
    two_pipelines_in_one_process,
)

TIMEOUT = 240


def _run(world: int, cases: list) -> list[list[dict]]:
    results = run_workers(run_many, world, cases, timeout=TIMEOUT)
    check_many(results, cases)
    return results


@pytest.mark.parametrize("ranks", range(1, 9))
def test_dualpipev_matches_reference(ranks):
    P = ranks
    minimum = ("dualpipev", 2 * P, {"return_outputs": True})   # the fewest micro-batches the reference accepts
    odd = ("dualpipev", 2 * P + 1, {})
    large = ("dualpipev", 4 * P + 3, {"return_outputs": True})
    few = ("dualpipev", 3, {})                                  # fewer than 2P: beyond the reference
    cases = {1: [minimum, odd, large], 2: [minimum, odd, large, few], 3: [minimum, odd, large],
             4: [minimum, odd], 5: [odd], 6: [minimum], 7: [odd], 8: [minimum, odd]}[P]
    _run(P, cases)


@pytest.mark.parametrize("ranks", [2, 4, 6, 8])
def test_dualpipe_matches_reference(ranks):
    P = ranks
    minimum, odd = ("dualpipe", 2 * P, {"return_outputs": True}), ("dualpipe", 2 * P + 3, {})
    large, few = ("dualpipe", 4 * P + 2, {"return_outputs": True}), ("dualpipe", P + 1, {})
    cases = {2: [minimum, odd, large, few], 4: [minimum, odd, few], 6: [odd], 8: [minimum]}[P]
    results = _run(P, cases)
    # inputs enter at both ends and the losses live there too
    assert [r[0]["has_loss"] for r in results] == [rank in (0, P - 1) for rank in range(P)]


def test_mixed_dtype_tuples_fp8_forward_only_and_variable_shapes():
    cases = [("dualpipev", 6, {"tuple_io": True, "return_outputs": True, "seq_lens": (3, 5)}),
             ("dualpipev", 7, {"tuple_io": True, "return_outputs": True, "forward_only": True, "steps": 2,
                                "seq_lens": (2, 4)}),
             ("dualpipe", 4, {"forward_only": True, "return_outputs": True}),
             ("1f1b", 3, {"tuple_io": True, "return_outputs": True})]
    _run(2, cases)


def test_optimizer_steps_keep_matching():
    cases = [("dualpipe", 8, {"steps": 3, "seq_lens": (3, 2, 4), "uneven": True}), ("dualpipev", 9, {"steps": 3})]
    results = _run(4, cases)
    assert results[0][0]["loss_changed"] and results[0][1]["loss_changed"]


def test_overlap_hook_checkpointing_and_mean_reduction():
    cases = [("dualpipev", 6, {"block": "overlap"}),
             ("dualpipe", 5, {"block": "overlap", "checkpoint": True, "reduction": "mean", "return_outputs": True}),
             ("dualpipev", 7, {"checkpoint": True, "reduction": "mean", "tuple_io": True})]
    results = _run(2, cases)
    assert all(r[0]["hook_calls"] > 0 for r in results)  # F&B pairs went through the class's hook


def test_engine_runs_every_schedule_kind_on_the_same_stages():
    cases = [("1f1b", 5, {"return_outputs": True}), ("zb1p", 6, {}), ("zb1p", 2, {"steps": 2}),
             ("interleaved", 6, {"return_outputs": True}), ("dualpipev", 6, {})]
    _run(3, cases)


def test_subgroup_pipelines_with_rank_mapping():
    """Two pipelines over subgroups of a 4-rank world, pipeline ranks mapped in reverse."""
    results = run_workers(run_many, 4, [("dualpipe", 4, {"group_ranks": [0, 2], "reverse_mapping": True}),
                                        ("dualpipev", 5, {"group_ranks": [1, 3]})], timeout=TIMEOUT)
    check_many(results, ["dualpipe on [0, 2]", "dualpipev on [1, 3]"])
    assert results[0][1].get("skipped") and not results[1][1].get("skipped")


def test_expert_parallel_collectives_inside_stages_of_subgroup_pipelines():
    results = run_workers(expert_parallel_pipelines, 4, timeout=TIMEOUT)
    check_many(results, ["dualpipev", "dualpipe"])
    assert all(r[1]["hook_calls"] > 0 for r in results)
    assert [r[0]["has_loss"] for r in results] == [False, False, True, True]  # reversed mapping: rank 0 of the
    # pipeline, which holds inputs and losses, is the second member of each subgroup


def test_two_pipelines_in_one_process():
    results = run_workers(two_pipelines_in_one_process, 2, timeout=TIMEOUT)
    check_many(results, ["dualpipev", "dualpipe with a split_backward hook"])
    assert all(r[1]["hook_calls"] > 0 for r in results)


def test_invalid_use_raises_and_stalls_are_reported():
    results = run_workers(invalid_use, 3, timeout=TIMEOUT)
    expected = {
        "odd_ranks": r"ValueError: DualPipe needs an even number of ranks .* got 3; use 2 or 4 ranks, or DualPipeV",
        "module_count": r"ValueError: pipeline rank \d of a dualpipev schedule holds 2 stages .* but 1 modules",
        "not_a_module": r"TypeError: stages must be nn.Modules, got function",
        "reduction": r"ValueError: loss_reduction must be 'sum' or 'mean', got 'avg'",
        "mapping": r"ValueError: rank_mapping must be a permutation of 0..2",
        "zero_chunks": r"ValueError: num_chunks must be a positive int",
        "rounds": r"ValueError: interleaved: num_microbatches \(7\) must be a multiple .* nearest valid values: 6, 8",
        "fixed_count": r"ValueError: num_chunks=4 but the fixed schedule has 6 micro-batches",
        "no_criterion": r"ValueError: pipeline rank 0 computes the loss .* needs criterion=",
        "no_split": r"ValueError: input 0 of shape \(7, 3, 8\) does not split into 4 micro-batches .* divisible by 4",
        "view": r"ValueError: stage 0 output 0 is a view of \(or the same tensor as\) one of its inputs.*x.clone\(\)",
    }
    for rank, out in enumerate(results):
        for name, pattern in expected.items():
            assert re.search(pattern, out[name]), f"rank {rank} {name}: {out[name]}"
    assert re.search(r"ValueError: input 0 of shape \(7, 3, 8\) does not split", results[0]["partial"])
    for rank in (1, 2):  # the others report a stall that names what rank 0 said
        msg = results[rank]["partial"]
        assert msg.startswith(f"PipelineStallError: pipeline step stalled on rank {rank}: no progress for 3 s")
        assert "waiting for the description of F" in msg and "receives posted and not yet used" in msg
        assert "rank 0: failed before communicating: ValueError: input 0 of shape (7, 3, 8)" in msg
    for out in results:  # disagreeing micro-batch counts: every rank stops, saying where
        msg = out["mismatch"]
        assert msg.startswith("PipelineStallError: pipeline step stalled"), msg
        assert re.search(r"at op \d+/\d+ of dualpipev: step \d+ \(\S+\); waiting for B\d+\.\d+ from rank \d", msg)


def test_a_micro_batch_of_another_layout_is_named_and_a_stalled_engine_refuses_to_continue():
    results = run_workers(layout_changes, 2, timeout=TIMEOUT)
    shape, grad = results[0]["shape"], results[1]["grad"]
    assert shape.startswith("ValueError: stage 0 (pipeline rank 0) output of micro-batch 1: tensor 0 is (2, 4, 8) "
                            "float32 requiring grad, expected (2, 3, 8) float32 requiring grad (as micro-batch 0's, "
                            "announced to pipeline rank 1 for this step)"), shape
    assert grad.startswith("ValueError: stage 1 (pipeline rank 1) input gradients of micro-batch 0: tensor 0 is "
                           "(2, 1, 8) float32, expected (2, 3, 8) float32"), grad
    # the peer waiting for the message reports a stall that names the failure
    assert results[1]["shape"].startswith("PipelineStallError: pipeline step stalled on rank 1")
    assert "rank 0: failed: ValueError at op" in results[1]["shape"] and "micro-batch 1" in results[1]["shape"]
    assert results[0]["grad"].startswith("PipelineStallError: pipeline step stalled on rank 0")
    for rank, out in enumerate(results):
        for name in ("shape", "grad"):
            again = out[f"{name}_again"]
            assert again.startswith("RuntimeError: this pipeline engine cannot run another step: step 1 "), again
            assert "Build a new engine on a new process group" in again, again
        assert out["rebuilt"], f"rank {rank}: a new engine on a new group did not train"


@pytest.mark.parametrize("got, message", [
    ([((2, 3), torch.float64, True)], r"tensor 0 is \(2, 3\) float64 requiring grad, expected \(2, 3\) float32 "
                                      r"requiring grad \(as the first\)"),
    ([((2, 3), torch.float32, False)], r"tensor 0 is \(2, 3\) float32, expected \(2, 3\) float32 requiring grad "
                                       r"\(as the first\)"),
    ([((2, 3), torch.float32, True), ((2,), torch.int64, False)], r"2 tensors where the first layout has 1"),
])
def test_layout_check_names_the_tensor_and_what_differs(got, message):
    from dualflow.dualpipe.p2p import TensorSpec
    from dualflow.dualpipe.runtime import _check_layout

    expected = (TensorSpec((2, 3), torch.float32, True),)
    _check_layout(expected, expected, "m", "the first", "fix")  # equal layouts pass
    with pytest.raises(ValueError, match=r"^stage 5 output of micro-batch 3: " + message + r"\. fix$"):
        _check_layout(tuple(TensorSpec(*g) for g in got), expected, "stage 5 output of micro-batch 3", "the first",
                      "fix")
