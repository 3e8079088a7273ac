"""train.compile: compiled phases against eager ones, the overlapped step over them, fallbacks and reports."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dualflow.launcher.config import ConfigError
from dualflow.train.compile import PhaseCompiler, eager_reason
from dualflow.train.model import ModelConfig, Stage, cross_entropy
from dualflow.train.trainer import Trainer
from tests.train.helpers import tiny
from tests.train.test_stage import MLA, _assert_bitwise, _run_both

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

@pytest.fixture(autouse=True)
def _fresh_compiler():
    # dynamo keeps compiled code per function across calls of torch.compile (whatever the backend): each
    # test starts from nothing, so that what it compiles is compiled by its own backend
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


CFG = ModelConfig(dim=32, n_layers=3, n_dense_layers=1, n_heads=4, dense_hidden=48, expert_hidden=16,
                  n_routed_experts=4, top_k=2)


def _step(stage: Stage, x: torch.Tensor, labels: torch.Tensor):
    out = stage(x)
    cross_entropy(out, labels).backward()
    grads = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    loads = {lid: r.load.clone() for lid, r in stage.moe_routers().items()}
    return out.detach(), grads, loads


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    # Traced, scaled_dot_product_attention runs torch's math kernel instead of the fused CPU one (and AOT
    # autograd may order independent sums differently): float32 results move by a few ulps (2^-23) per
    # layer, measured 2e-7 of each tensor's largest value; BF16 activations by an ulp (2^-8) here and there,
    # measured 0.7%. The bounds leave a margin of 50x and 4x.
    bound = 1e-5 if dtype == torch.float32 else 8 * 2.0 ** -8
    return bool((a.double() - b.double()).abs().max() <= bound * b.double().abs().max())


def _phase_names(cfg: ModelConfig) -> tuple[set[str], set[str]]:
    """(compute phases compiled, phases kept eager) of a whole-model stage of ``cfg``."""
    moe = [f"L{i}" for i in range(cfg.n_dense_layers, cfg.n_layers)]
    return ({f"L{i}.attn" for i in range(cfg.n_layers)} | {f"L{i}.mlp" for i in range(cfg.n_layers)} | {"head"},
            {"embed"} | {f"{layer}.{kind}" for layer in moe for kind in ("dispatch", "combine")})


@pytest.mark.parametrize("cfg", [CFG, MLA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_phases_match_eager(cfg, dtype):
    g = torch.Generator().manual_seed(3)
    x, labels = torch.randint(0, 256, (2, 8), generator=g), torch.randint(0, 256, (2, 8), generator=g)
    results = []
    for compiled in (False, True):
        stage = Stage(cfg, range(cfg.n_layers), first=True, last=True, compute_dtype=dtype)
        stage.init_weights(0)
        if compiled:
            stage.compiler = PhaseCompiler(backend="aot_eager")
        results.append(_step(stage, x, labels))
        if compiled:
            names, eager = _phase_names(cfg)
            moe_mlp = {f"L{i}.mlp" for i in range(cfg.n_dense_layers, cfg.n_layers)}
            # the experts' grouped GEMM traces in BF16; in float32 it fails to trace in torch 2.11-2.13 (its
            # fake implementation wants BF16), so those phases run eagerly, which this comparison covers too
            assert set(stage.compiler.compiled_names()) == (names if dtype == torch.bfloat16 else names - moe_mlp) \
                or set(stage.compiler.compiled_names()) == names
            assert set(stage.compiler.eager) == eager
    (out_a, g_a, l_a), (out_b, g_b, l_b) = results
    assert _close(out_b, out_a, dtype)
    assert g_a.keys() == g_b.keys() and len(g_a) > 10
    for name in g_a:
        assert _close(g_b[name], g_a[name], dtype), name
    # the routers' load counts ran inside the compiled phases; the forward routed every token alike
    assert l_a.keys() == l_b.keys() and all(torch.equal(l_a[k], l_b[k]) and l_a[k].sum() > 0 for k in l_a)


def test_overlapped_step_over_compiled_phases_equals_plain_autograd_bitwise():
    def setup(m0, m1):
        compiler = PhaseCompiler(backend="aot_eager")
        for m in (m0, m1):
            m.stage.compiler = compiler

    # both sides run the same compiled graphs, and the phase-by-phase backward calls their backward as
    # autograd does: bitwise, as for eager phases (test_stage.py)
    _assert_bitwise(_run_both(MLA, setup))


def test_fp8_phases_compile_and_match_eager():
    from dualflow.fp8 import Fp8Recipe, convert_to_fp8
    from dualflow.fp8.nn import enable_fp8_snapshots

    cfg = dataclasses.replace(CFG, dim=128)
    g = torch.Generator().manual_seed(5)
    x, labels = torch.randint(0, 256, (2, 64), generator=g), torch.randint(0, 256, (2, 64), generator=g)
    results = []
    for compiled, snapshots in ((False, False), (True, False), (True, True)):
        stage = Stage(cfg, range(cfg.n_layers), first=True, last=True)
        stage.init_weights(0)
        convert_to_fp8(stage)
        for layer in stage.layers.values():
            if layer.moe is not None:
                layer.moe.experts.enable_fp8(Fp8Recipe())
        if snapshots:  # the weights' FP8 copies made once, outside the graph (what the trainer does)
            assert enable_fp8_snapshots(stage) > 0
        if compiled:
            stage.compiler = PhaseCompiler(backend="aot_eager")
        results.append(_step(stage, x, labels))
    assert set(stage.compiler.compiled_names()) == _phase_names(cfg)[0] - {"L1.mlp", "L2.mlp"} or \
        set(stage.compiler.compiled_names()) == _phase_names(cfg)[0]
    (out_a, g_a, _), (out_b, g_b, _), (out_c, g_c, _) = results
    # float32 compute: the compiled forward quantizes the weights in the graph to the same FP8 values the
    # eager caches hold and runs the same kernels: bitwise. The backward's attention kernel differs by
    # ulps (see _close); where such a difference moves a gradient element across an FP8 rounding
    # boundary it changes by one FP8 step, at most 2^-3 of that element, and such moves are rare: the
    # gradients stay within 2^-4 of each tensor's largest value (measured 0.3%).
    assert torch.equal(out_a, out_b) and torch.equal(out_a, out_c)
    assert g_a.keys() == g_b.keys() == g_c.keys()
    for name in g_a:
        for g in (g_b, g_c):
            assert (g_a[name] - g[name]).abs().max() <= 2.0 ** -4 * g_a[name].abs().max(), name


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no code generator for this graph")


def test_a_phase_that_fails_to_compile_stays_eager_with_one_line():
    lines = []
    kw = dict(first=True, last=True, compute_dtype=torch.bfloat16)  # BF16: every compute phase traces
    stage = Stage(CFG, range(CFG.n_layers), **kw)
    stage.init_weights(0)
    reference = Stage(CFG, range(CFG.n_layers), **kw)
    reference.init_weights(0)
    stage.compiler = PhaseCompiler(backend=_failing_backend, on_fallback=lines.append)
    stage.phases()
    assert stage.compiler.summary().startswith("compile: 7 phase(s) to compile with torch.compile (backend _failing")
    x = torch.randint(0, 256, (2, 8))
    for _ in range(2):  # the second step does not try again
        out = stage(x)
    assert torch.equal(out, reference(x))  # eager, bit for bit
    assert stage.compiler.compiled_names() == []
    assert len(lines) == 1 and "L0.attn failed" in lines[0] and "no code generator" in lines[0]  # one per reason
    assert stage.compiler.summary().startswith("compile: 0 phase(s) to compile")
    assert "compilation failed" in stage.compiler.summary()


def test_without_gradients_the_eager_functions_run():
    calls = []

    def counting(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    stage = Stage(CFG, range(CFG.n_layers), first=True, last=True)
    stage.init_weights(0)
    stage.compiler = PhaseCompiler(backend=counting)
    with torch.no_grad():
        stage(torch.randint(0, 256, (2, 8)))
    assert calls == []
    stage(torch.randint(0, 256, (2, 8)))
    assert calls  # with gradients, the phases compile


def test_phases_that_stay_eager_say_why():
    from dualflow.fp8 import convert_to_fp8

    stage = Stage(dataclasses.replace(CFG, dim=128), range(CFG.n_layers), first=True, last=True)
    reasons = {p.name: eager_reason(p) for p in stage.phases()}
    assert reasons["L1.dispatch"] == "a communication phase" and reasons["L1.attn"] is None
    assert reasons["L1.mlp"] is None and "embedding" in reasons["embed"]
    # an expert-parallel exchange makes the experts' phase non-static (test_stage.py runs one across ranks)
    mlp = next(p for p in stage.phases() if p.name == "L1.mlp")
    assert "changes from step to step" in eager_reason(mlp._replace(static=False))
    convert_to_fp8(stage)  # FP8 layers trace through their custom operators
    assert eager_reason(next(p for p in stage.phases() if p.name == "L1.attn")) is None


def test_training_with_inductor_tracks_eager_and_reports(tmp_path, capsys):
    runs = {}
    for mode in ("off", "on"):
        cfg = tiny(tmp_path / mode, train=dict(steps=2, val_every=2, compile=mode), parallel=dict(microbatches=2),
                   checkpoint=dict(enabled=False))
        trainer = Trainer(cfg)
        runs[mode] = trainer.train().losses
        assert trainer.compile_report.startswith(f"compile: {'off' if mode == 'off' else '9 phase(s) to compile'}")
    # float32; inductor fuses and reorders the elementwise work and reductions: rounding differences of
    # a few ulps per operation, amplified over two Adam steps, stay far below 1e-4 relative
    for step, loss in runs["off"].items():
        assert abs(runs["on"][step] - loss) <= 1e-4 * abs(loss), step
    assert "phase(s) to compile with torch.compile" in capsys.readouterr().out


def test_compile_setting_is_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.compile"):
        tiny(tmp_path, train=dict(compile="yes"))


@pytest.mark.gpu
def test_compiled_graphed_step_on_gpu_tracks_eager(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    losses = {}
    for mode in ("off", "auto"):
        cfg = tiny(tmp_path / mode, train=dict(steps=5, val_every=5, compile=mode, dtype="bfloat16"),
                   parallel=dict(microbatches=2), checkpoint=dict(enabled=False))
        trainer = Trainer(cfg, device=device)
        losses[mode] = trainer.train().losses
        if mode == "auto":
            assert trainer.compile_report.startswith("compile: 9 phase(s) to compile"), trainer.compile_report
            assert set(trainer.stages[0].compiler.compiled_names()) == _phase_names(cfg.model)[0]
            assert trainer.engine.replays >= 2  # the compiled phases were captured into the step's graph
    for step, loss in losses["off"].items():  # BF16 compute: inductor's own kernels round differently
        assert abs(losses["auto"][step] - loss) <= 2e-2 * abs(loss), step
