"""The FP8 layers under ``torch.compile(fullgraph=True)``: no graph break, forward and backward equal to eager.

Why bit for bit with ``aot_eager``: the compiled graph runs the same ``torch.ops.dualflow`` kernels in the
same order on the same operands as eager mode (quantize x, the forward GEMM, quantize dy, the two backward
GEMMs; the weight is quantized by the same kernel, in the graph instead of the cache), and aot_eager runs
the surrounding torch operations (bias add, reshapes, the bias gradient's sum) as the same eager kernels.
Inductor generates its own code for those surrounding operations (the bias gradient's reduction order
may differ), so there the bias gradient is compared with a bound from FP32 summation instead.
"""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import Fp8GroupedLinear, Fp8Linear, Fp8Recipe, fp8_grouped_mlp
from tests.fp8.helpers import adversarial, assert_bitwise

REF = Fp8Recipe(backend="reference", quant_backend="reference")


def _linear_step(module, x, dy):
    xx = x.detach().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(xx)
    y.backward(dy)
    grads = [xx.grad, module.weight.grad] + ([module.bias.grad] if module.bias is not None else [])
    return [y, *grads]


def _input(shape: tuple[int, ...], kind: str) -> torch.Tensor:
    rows = 1
    for d in shape[:-1]:
        rows *= d
    x = adversarial(rows, shape[-1], kind, seed=3) if kind != "zero_rows" else torch.randn(rows, shape[-1])
    if kind == "zero_rows":
        x[::3] = 0.0
    return x.view(shape)


def _traced_like_eager(fn, step, *args) -> None:
    """``fn`` traces with no graph break, and ``step(compiled fn)`` (forward + backward) equals ``step(fn)`` bit
    for bit."""
    want = step(fn)
    torch.compiler.reset()
    explain = torch._dynamo.explain(fn)(*args)
    assert explain.graph_break_count == 0, explain.break_reasons
    torch.compiler.reset()
    for w, g in zip(want, step(torch.compile(fn, fullgraph=True, backend="aot_eager"))):
        assert_bitwise(w, g)


@pytest.mark.parametrize("shape,kind,bias", [
    ((3, 70, 256), "normal", True),      # ragged token count (210 rows)
    ((130, 256), "zero_rows", False),
    ((2, 64, 256), "nonfinite", True),   # NaN/Inf tiles: NaN through both GEMMs, in the same places
])
def test_fp8_linear_aot_eager_is_bitwise_eager(shape, kind, bias):
    torch.manual_seed(0)
    layer = Fp8Linear(256, 144, bias=bias, recipe=REF)
    x = _input(shape, kind)
    dy = torch.randn(*shape[:-1], 144)
    want = _linear_step(layer, x, dy)
    assert layer.fp8_cache.builds == 1
    torch.compiler.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got = _linear_step(compiled, x, dy)
    for w, g in zip(want, got):
        assert_bitwise(w, g)
    assert layer.fp8_cache.builds == 1  # the traced layer quantizes its weight in the graph, not in the cache


def test_fp8_linear_has_no_graph_break_forward_or_backward():
    layer = Fp8Linear(256, 128, recipe=REF)
    x = torch.randn(64, 256, requires_grad=True)
    torch.compiler.reset()
    explain = torch._dynamo.explain(lambda t: layer(t).sum())(x)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1
    # the backward is traced too (fullgraph=True would raise on a break in either direction)
    step = torch.compile(lambda t: layer(t).square().sum(), fullgraph=True, backend="aot_eager")
    step(x).backward()
    assert x.grad is not None and layer.weight.grad is not None


@pytest.mark.slow
def test_fp8_linear_inductor_matches_eager():
    torch.manual_seed(0)
    layer = Fp8Linear(256, 128, recipe=REF)
    x, dy = torch.randn(2, 96, 256), torch.randn(2, 96, 128)
    want = _linear_step(layer, x, dy)
    torch.compiler.reset()
    got = _linear_step(torch.compile(layer, fullgraph=True, backend="inductor"), x, dy)
    for w, g in zip(want[:3], got[:3]):  # the FP8 kernels' results: the same operators on the same operands
        assert_bitwise(w, g)
    # the bias gradient, a sum of 192 FP32 rows in another order: |error| <= rows * eps * sum |dy|
    bound = dy.shape[0] * dy.shape[1] * torch.finfo(torch.float32).eps * dy.abs().sum((0, 1))
    assert ((want[3] - got[3]).abs() <= bound).all()


def test_fp8_grouped_mlp_aot_eager_is_bitwise_eager():
    torch.manual_seed(0)
    experts, dim, hidden = 2, 128, 128
    x = adversarial(384, dim, "zero_tiles", seed=1)
    w13 = (torch.randn(experts, 2 * hidden, dim) * dim ** -0.5).requires_grad_(True)
    w2 = (torch.randn(experts, dim, hidden) * hidden ** -0.5).requires_grad_(True)
    offsets = torch.tensor([0, 128, 384], dtype=torch.int32)
    dy = torch.randn(384, dim)

    def step(fn):
        xx = x.detach().requires_grad_(True)
        w13.grad = w2.grad = None
        y = fn(xx, w13, w2)
        y.backward(dy)
        return y, xx.grad, w13.grad, w2.grad

    def mlp(a, b, c):
        return fp8_grouped_mlp(a, b, c, offsets, REF)

    _traced_like_eager(mlp, step, x, w13, w2)


def test_fp8_grouped_linear_aot_eager_is_bitwise_eager():
    torch.manual_seed(0)
    layer = Fp8GroupedLinear(3, 128, 256, recipe=REF)
    sizes = [100, 0, 156]  # ragged and empty experts: the per-expert weight-gradient path
    x, dy = torch.randn(256, 128), torch.randn(256, 256)

    def step(fn):
        xx = x.detach().requires_grad_(True)
        layer.weight.grad = None
        y = fn(xx)
        y.backward(dy)
        return y, xx.grad, layer.weight.grad

    def run(t):
        return layer(t, sizes)

    _traced_like_eager(run, step, x)


def test_lean_eager_path_equals_the_validated_path():
    # the eager layer calls the kernels directly with backends resolved once; an input it does not take fast
    # (a float64 one, below) goes the validated way, whose errors name the layer
    from dualflow.fp8.nn import _Fp8LinearFn

    torch.manual_seed(0)
    layer = Fp8Linear(256, 128, recipe=REF)
    x, dy = torch.randn(200, 256), torch.randn(200, 128)
    want = _linear_step(layer, x, dy)
    xx = x.detach().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    # no plan: every quantizer and GEMM through the public, checking functions
    y = _Fp8LinearFn.apply(xx, layer.weight, layer.bias, layer.fp8_cache, layer.recipe, None, None, True, True, "layer",
                           None)
    y.backward(dy)
    for w, g in zip(want, [y, xx.grad, layer.weight.grad, layer.bias.grad]):
        assert_bitwise(w, g)
    with pytest.raises(TypeError, match=r"^Fp8Linear \(in 256, out 128\), forward of an input of shape \(4, 256\) "
                                        r"\(torch.float64\): quantize_1x128_and_128x1 expects float32"):
        layer(torch.randn(4, 256, dtype=torch.float64))


@pytest.mark.parametrize("quant_backend", ["reference", "triton"])
def test_compiled_layer_reads_its_snapshot_which_refreshes_in_place(quant_backend):
    import torch._dynamo.testing

    from dualflow.fp8.nn import enable_fp8_snapshots, refresh_fp8_snapshots

    recipe = Fp8Recipe(backend="reference", quant_backend=quant_backend)
    torch.manual_seed(0)
    layer, eager = Fp8Linear(256, 128, recipe=recipe), Fp8Linear(256, 128, recipe=recipe)
    eager.load_state_dict(layer.state_dict())
    assert enable_fp8_snapshots(layer) == 1 and layer.fp8_snapshot.refreshes == 1
    storage = [t.data_ptr() for t in layer.fp8_snapshot.tensors]
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, backend=counter, fullgraph=True)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (layer, eager)]
    for step in range(3):
        x = torch.randn(200, 256)
        want, got = _linear_step(eager, x, torch.ones(200, 128)), _linear_step(compiled, x, torch.ones(200, 128))
        for w, g in zip(want, got):
            assert_bitwise(w, g)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if step < 2:
            refresh_fp8_snapshots(layer)  # the weights changed: the contract is to refresh before the next call
    assert counter.frame_count == 1 and layer.fp8_snapshot.refreshes == 3
    assert [t.data_ptr() for t in layer.fp8_snapshot.tensors] == storage  # what a CUDA graph replays
    # not refreshed after the last update: the compiled layer still computes with the previous weights
    x = torch.randn(200, 256)
    assert not torch.equal(compiled(x), eager(x))
    refresh_fp8_snapshots(layer)
    assert_bitwise(eager(x), compiled(x))


@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 130), (2, 200, 256), (0, 256, 384)],
                         ids=["dense", "stacked", "ragged_rows", "no_experts"])
def test_snapshot_refresh_rewrites_the_same_storage(shape):
    from dualflow.fp8.nn import Fp8WeightSnapshot, quantize_weight

    recipe = Fp8Recipe(quant_backend="triton")
    w = torch.randn(*shape)
    snap = Fp8WeightSnapshot()
    snap.refresh(w, recipe)
    storage = [t.data_ptr() for t in snap.tensors]
    w.mul_(3.0).add_(1.0)
    snap.refresh(w, recipe)
    assert [t.data_ptr() for t in snap.tensors] == storage
    for got, want in zip(snap.tensors, quantize_weight(w, Fp8Recipe(quant_backend="reference"), transposed=True)):
        assert_bitwise(want, got)
