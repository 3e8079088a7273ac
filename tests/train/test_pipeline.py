"""Pipeline + expert-parallel training on gloo against one process running the same model and data."""

from __future__ import annotations

import pytest

from dualflow.train.trainer import Trainer
from tests.dist import run_workers
from tests.train.helpers import tiny, train_worker, train_worker_overlap_counts, train_worker_params

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _single(tmp_path, **kw):
    return Trainer(tiny(tmp_path / "single", **kw)).train().losses


def _relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[k] - b[k]) / abs(b[k]) for k in a)


def test_dualpipev_with_expert_parallel_matches_one_process(tmp_path):
    # 2 pipeline ranks (4 stages, V-shaped) x 2 expert/data-parallel ranks, the default layout.
    reference = _single(tmp_path)
    results = run_workers(train_worker, 4, tiny(tmp_path / "pp", parallel=dict(pp=2, dp=2)), timeout=180)
    assert all(r[0] == results[0][0] for r in results)  # every rank reports the global loss
    # The pipeline alone is bitwise (same micro-batches, same order of accumulation); with dp = 2 each rank
    # averages its half of the batch and the halves are summed, and each expert multiplies rows from both
    # ranks at once, which rounds differently in FP32 than the one-process run.
    assert _relative(results[0][0], reference) < 1e-5


@pytest.mark.parametrize("schedule", ["dualpipev", "1f1b", "zb1p"])
def test_pipeline_alone_is_bitwise_equal_to_one_process(tmp_path, schedule):
    reference = _single(tmp_path)
    results = run_workers(train_worker, 2, tiny(tmp_path / "pp", parallel=dict(pp=2, schedule=schedule)),
                          timeout=180)
    # Bitwise on any CPU: every stage runs the one-process run's operations on the same micro-batch shapes,
    # one intra-op thread in every process (tests/train/conftest.py, tests/dist.py).
    assert results[0][0] == reference


def test_dualpipe_matches_one_process(tmp_path):
    reference = _single(tmp_path)
    results = run_workers(train_worker, 2, tiny(tmp_path / "pp", parallel=dict(pp=2, schedule="dualpipe")),
                          timeout=180)
    # Each end feeds half of the micro-batches through its own copy of every stage; the copies' gradients
    # are summed afterwards, (g1 + g2) + (g3 + g4) where one process accumulates ((g1 + g2) + g3) + g4.
    assert _relative(results[0][0], reference) < 1e-5


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_overlapped_pairs_run_phase_by_phase(tmp_path, schedule):
    cfg = tiny(tmp_path, parallel=dict(pp=2, dp=2, schedule=schedule))
    for _, interleaved, fallbacks in run_workers(train_worker_overlap_counts, 4, cfg, timeout=180):
        assert interleaved > 0 and fallbacks == 0


def test_overlapped_and_plain_pipeline_steps_are_bitwise_equal(tmp_path):
    runs = {}
    for overlap in (True, False):
        cfg = tiny(tmp_path / f"ov{overlap}", parallel=dict(pp=2, dp=2, overlap=overlap))
        runs[overlap] = run_workers(train_worker_params, 4, cfg, timeout=180)
    # Bitwise on any CPU: the overlap reorders independent operations, each of which runs on the same
    # shapes and inputs with the same thread setting as without it.
    for (loss_a, state_a), (loss_b, state_b) in zip(runs[True], runs[False]):
        assert loss_a == loss_b
        assert state_a.keys() == state_b.keys()
        for name in state_a:
            assert state_a[name].equal(state_b[name]), name


def test_tied_embeddings_across_the_v(tmp_path):
    # DualPipeV puts stage 0 (embedding) and stage 3 (head) on pipeline rank 0: the head borrows the weight.
    reference = _single(tmp_path, model=dict(tie_embeddings=True))
    results = run_workers(train_worker, 2, tiny(tmp_path / "pp", model=dict(tie_embeddings=True),
                                                parallel=dict(pp=2)), timeout=180)
    # Not bitwise: the shared weight's gradient adds the head's and the embedding's terms in the order the
    # schedule runs stage 3 and stage 0 backwards, one process adds them per micro-batch.
    assert _relative(results[0][0], reference) < 1e-5


def test_latent_attention_trains_through_dualpipev_and_expert_parallel(tmp_path):
    # Multi-head latent attention in the default layout (2 pipeline x 2 expert-parallel ranks, overlapped
    # F&B): the same losses as one process, within the FP32 reduction-order bound of the test above.
    mla = dict(attention="mla", q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4,
               v_head_dim=8)
    reference = _single(tmp_path, model=mla)
    results = run_workers(train_worker, 4, tiny(tmp_path / "pp", model=mla, parallel=dict(pp=2, dp=2)),
                          timeout=180)
    assert _relative(results[0][0], reference) < 1e-5
    assert results[0][0] != _single(tmp_path / "mha")  # it is another model than the plain attention
