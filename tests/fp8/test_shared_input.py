"""Fp8Linear.shared_input: layers reading one input quantize it once, with the separate calls' results.

Bit for bit, because the shared path runs the same kernels on the same operands: the input's quantization
is the one each layer would make (the same operator, the same input), each layer's GEMMs and its output
gradient's quantization are unchanged, and autograd adds the layers' input gradients exactly as it adds
them when the layers are called one by one (the same graph: one input feeding several functions).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dualflow.fp8.nn as fp8_nn
from dualflow.fp8 import Fp8Linear, Fp8Recipe, convert_to_fp8
from tests.fp8.helpers import assert_bitwise
from tests.fp8.test_compile import _input, _traced_like_eager
from tests.fp8.test_nn import _SavedBytes

REF = Fp8Recipe(backend="reference", quant_backend="reference")


def _layers(outs=(144, 64), bias=(True, False), recipe=REF, in_f=256, seed=0):
    torch.manual_seed(seed)
    layers = [Fp8Linear(in_f, out, bias=b, recipe=recipe) for out, b in zip(outs, bias)]
    with torch.no_grad():
        for layer in layers:
            if layer.bias is not None:
                layer.bias.normal_()
    return layers


def _step(layers, x, dys, shared: bool):
    xx = x.detach().requires_grad_(True)
    for layer in layers:
        layer.zero_grad(set_to_none=True)
    ys = Fp8Linear.shared_input(xx, layers) if shared else [layer(xx) for layer in layers]
    torch.autograd.backward(ys, dys)
    grads = [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]
    return [*ys, xx.grad, *grads]


@pytest.mark.parametrize("recipe", [REF, Fp8Recipe(backend="reference", quant_backend="triton")],
                         ids=["reference", "triton-quant"])
@pytest.mark.parametrize("shape,kind", [((3, 70, 256), "normal"), ((130, 256), "zero_rows"),
                                        ((2, 64, 256), "nonfinite")])
def test_shared_input_is_the_separate_calls_bit_for_bit(shape, kind, recipe):
    if recipe.quant_backend == "triton":
        pytest.importorskip("triton")
    layers = _layers(outs=(144, 64, 96), bias=(True, False, True), recipe=recipe)
    x = _input(shape, kind)
    dys = [torch.randn(*shape[:-1], layer.out_features) for layer in layers]
    want = _step(layers, x, dys, shared=False)
    got = _step(layers, x, dys, shared=True)
    assert len(want) == len(got) == 3 + 1 + 5
    for w, g in zip(want, got):
        assert_bitwise(w, g)


def test_a_frozen_layer_and_no_grad():
    layers = _layers()
    layers[1].weight.requires_grad_(False)
    x, dys = torch.randn(96, 256), [torch.randn(96, 144), torch.randn(96, 64)]
    for w, g in zip(_step(layers, x, dys, shared=False), _step(layers, x, dys, shared=True)):
        assert_bitwise(w, g)
    with torch.no_grad():
        for w, g in zip([layer(x) for layer in layers], Fp8Linear.shared_input(x, layers)):
            assert_bitwise(w, g)


def test_the_input_is_quantized_once_and_its_128x1_layout_saved_once(monkeypatch):
    layers = _layers(outs=(144, 64, 96), bias=(False, False, False))
    x = torch.randn(128, 256, requires_grad=True)
    calls = []
    real = fp8_nn.quantize_entry
    monkeypatch.setattr(fp8_nn, "quantize_entry", lambda t, *a: calls.append(tuple(t.shape)) or real(t, *a))
    saved = {}
    for shared in (False, True):
        calls.clear()
        counter = _SavedBytes(nn.ModuleList(layers))
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            ys = Fp8Linear.shared_input(x, layers) if shared else [layer(x) for layer in layers]
        assert calls.count((128, 256)) == (1 if shared else 3)
        saved[shared] = counter.total
        torch.autograd.backward(ys, [torch.ones_like(y) for y in ys])
        assert calls.count((128, 256)) == (1 if shared else 3)  # the backward quantizes the output gradients
    # x's 128x1 layout (fp8 bytes and scales) once instead of three times
    one = 128 * 256 + 4 * 256
    assert saved[False] - saved[True] == 2 * one


def test_layers_that_cannot_share_are_called_one_by_one(monkeypatch):
    calls = []
    real = fp8_nn.quantize_entry
    monkeypatch.setattr(fp8_nn, "quantize_entry", lambda t, *a: calls.append(1) or real(t, *a))
    x = torch.randn(64, 256)
    a, b = _layers()
    other = Fp8Linear(256, 32, recipe=Fp8Recipe(backend="reference", quant_backend="reference", pow2_scales=True))
    plain = nn.Linear(256, 32)
    for group in ([a, other], [a, plain], [a]):
        calls.clear()
        for w, g in zip([layer(x) for layer in group], Fp8Linear.shared_input(x, group)):
            assert_bitwise(w, g)
    assert Fp8Linear.shared_input(x, []) == []
    # an input the planned kernels do not take goes through each layer's checking path, which names it
    with pytest.raises(ValueError, match=r"Fp8Linear \(in 256, out 144\).*input must end in 256 features"):
        Fp8Linear.shared_input(torch.randn(4, 255), [a, b])
    empty = torch.randn(0, 256)
    for w, g in zip([a(empty), b(empty)], Fp8Linear.shared_input(empty, [a, b])):
        assert_bitwise(w, g)


def test_shared_input_compiles_without_a_break_and_matches_eager():
    layers = _layers()
    x = torch.randn(2, 64, 256)
    dys = [torch.randn(2, 64, 144), torch.randn(2, 64, 64)]

    def fn(t):
        return Fp8Linear.shared_input(t, layers)

    def step(f):
        xx = x.detach().requires_grad_(True)
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        ys = f(xx)
        torch.autograd.backward(ys, dys)
        return [*ys, xx.grad, *(p.grad for layer in layers for p in layer.parameters())]

    _traced_like_eager(fn, step, x)


def test_latent_attention_reads_its_input_once_with_the_same_results(monkeypatch):
    from dualflow.train import model as model_mod

    calls = []
    real = fp8_nn.quantize_entry
    monkeypatch.setattr(fp8_nn, "quantize_entry", lambda t, *a: calls.append(tuple(t.shape)) or real(t, *a))
    for q_rank in (0, 32):
        cfg = model_mod.ModelConfig(dim=128, n_heads=4, attention="mla", q_lora_rank=q_rank, kv_lora_rank=64,
                                    qk_rope_head_dim=16)  # wkv_a 64 + 16 wide: an FP8 width
        torch.manual_seed(0)
        attn = model_mod.LatentAttention(cfg)
        report = convert_to_fp8(attn, REF)
        assert "wkv_a" in report.converted and ("wq_a" if q_rank else "wq") in report.converted
        x = torch.randn(2, 48, 128)
        dy = torch.randn(2, 48, 128)

        def step(attn=attn, x=x, dy=dy):
            attn.zero_grad(set_to_none=True)
            xx = x.detach().requires_grad_(True)
            calls.clear()
            y = attn(xx)
            reads = calls.count((96, 128))
            y.backward(dy)
            return reads, [y, xx.grad, *(p.grad for p in attn.parameters())]

        reads, got = step()
        assert reads == 1, q_rank  # wq (or wq_a) and wkv_a share one quantization of x
        with monkeypatch.context() as m:
            m.setattr(model_mod, "shared_input", lambda t, layers: [layer(t) for layer in layers])
            reads, want = step()
        assert reads == 2
        for w, g in zip(want, got):
            assert_bitwise(w, g)
