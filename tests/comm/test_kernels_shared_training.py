"""The expert-parallel training job on ranks sharing one GPU: the kernels backend against the torch backend.

``pp = 1, dp = 2 or 4`` processes on cuda:0 in one gloo group (``DUALFLOW_COMM_SHARED_GPU=1``). Everything
outside dispatch/combine already runs on gloo with CUDA tensors there (all-reduces, broadcasts); the
pipeline's point-to-point transfers do not (gloo's send/recv take host memory only), so ``pp > 1`` is
out of reach on one GPU. Each worker trains the same config three times: torch backend twice (to learn
whether the job is deterministic on this GPU) and kernels once.
"""

from __future__ import annotations

import pytest
import torch

from tests.comm.test_kernels_shared_gpu import ENV, _mode, _report
from tests.dist import run_workers
from tests.train.helpers import tiny


def _train(rank, world, cfg, backend):
    import dualflow.train.ep as ep
    from dualflow.comm import Buffer
    from dualflow.train.trainer import Trainer

    def buffer(group, hidden, **kw):  # the job builds its buffer with backend="auto"; pick one explicitly
        return Buffer(group, hidden, **{**kw, "backend": backend})

    ep.Buffer = buffer
    trainer = Trainer(cfg, torch.device("cuda", 0))
    used = {layer.exchange.buffer.backend for s in trainer.stages for layer in s.layers.values()
            if getattr(layer, "exchange", None) is not None}
    return trainer.train().losses, sorted(used)


def _worker(rank, world, cfgs):
    torch.cuda.set_device(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return {name: _train(rank, world, cfg, backend) for name, (cfg, backend) in cfgs.items()}


@pytest.mark.gpu
@pytest.mark.timeout(600)
@pytest.mark.parametrize("dp", [2, 4], ids=lambda n: f"dp{n}")
def test_expert_parallel_job_kernels_equal_torch_on_one_gpu(tmp_path, dp):
    def cfg(name):
        return tiny(tmp_path / name, parallel=dict(dp=dp, microbatches=2),
                    train=dict(steps=8, global_batch=16, dtype="bfloat16", val_every=8))

    cfgs = {"torch": (cfg("torch"), "torch"), "torch again": (cfg("torch2"), "torch"),
            "kernels": (cfg("kernels"), "kernels")}
    env = {**ENV, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    results = run_workers(_worker, dp, cfgs, env=env, timeout=540)
    losses = {name: results[0][name][0] for name in cfgs}
    cases = {"backends as asked": [f"rank {r}: {name} ran on {res[name][1]}" for r, res in enumerate(results)
                                   for name, (_, backend) in cfgs.items() if res[name][1] != [backend]],
             "same losses on every rank": [f"rank {r}" for r, res in enumerate(results)
                                           if {n: res[n][0] for n in cfgs} != losses]}
    deterministic = losses["torch"] == losses["torch again"]
    kern, ref = losses["kernels"], losses["torch"]  # {step: loss}
    worst = max(abs(kern[step] - ref[step]) / abs(ref[step]) for step in ref) if kern.keys() == ref.keys() else 1.0
    # Bit for bit where the job itself repeats bit for bit on this GPU; otherwise within its own run-to-run
    # spread, which the tolerance of tests/train/test_gpu.py bounds.
    ok = kern == ref if deterministic else worst < 1e-4
    cases[f"losses equal to the torch backend's ({'bitwise' if deterministic else 'within 1e-4'})"] = \
        [] if ok else [f"kernels {kern} vs torch {ref} (max relative {worst:.2e})"]
    _report("training", dp, _mode(), cases)
    print(f"dp={dp}: torch run twice identical: {deterministic}; kernels vs torch max relative difference {worst:.2e}")
    failed = {k: v for k, v in cases.items() if v}
    assert not failed, failed
