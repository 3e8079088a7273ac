"""Fp8Linear, Fp8GroupedLinear and convert_to_fp8 (reference backends on the CPU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualflow.fp8 import (
    Fp8GroupedLinear,
    Fp8Linear,
    Fp8Recipe,
    convert_to_fp8,
    invalidate_fp8_caches,
)
from tests.fp8.helpers import assert_bitwise, sqnr_db


def _pair(in_f=256, out_f=384, bias=True, seed=0, dtype=torch.bfloat16):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        if bias:
            ref.bias.normal_()
    fp8 = Fp8Linear(in_f, out_f, bias=bias, dtype=dtype)
    fp8.load_state_dict(ref.state_dict())
    return ref, fp8


def _grads(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    params = [p for p in (module.weight, module.bias) if p is not None]
    return (y, *torch.autograd.grad(y, [x, *params], dy))


@pytest.mark.parametrize("bias", [True, False])
def test_output_and_gradients_within_25_db_of_bf16(bias):
    ref, fp8 = _pair(bias=bias)
    x = torch.randn(3, 100, 256, dtype=torch.bfloat16)
    dy = torch.randn(3, 100, 384, dtype=torch.bfloat16)
    want, got = _grads(ref, x, dy), _grads(fp8, x, dy)
    names = ["output", "input grad", "weight grad", "bias grad"][:len(want)]
    for name, w, g in zip(names, want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert sqnr_db(w, g) >= 25, f"{name}: {sqnr_db(w, g):.1f} dB"


def test_fp32_master_weights_under_autocast():
    ref, fp8 = _pair(dtype=torch.float32)
    x = torch.randn(64, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = ref(x), fp8(x)
    assert y.dtype == torch.bfloat16 == y_ref.dtype
    assert sqnr_db(y_ref, y) >= 25
    y.float().square().sum().backward()
    assert fp8.weight.grad.dtype == torch.float32 and fp8.bias.grad.dtype == torch.float32


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded (they live anyway)."""

    def __init__(self, module: nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def test_saves_at_most_55_percent_of_bf16_linear_for_backward():
    ref, fp8 = _pair(in_f=512, out_f=512)
    x = torch.randn(4, 256, 512, dtype=torch.bfloat16, requires_grad=True)
    measured = []
    for module in (ref, fp8):
        counter = _SavedBytes(module)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            y = module(x)
        y.sum().backward()
        measured.append(counter.total)
    assert measured[0] == x.numel() * 2  # nn.Linear keeps the BF16 input
    assert measured[1] <= 0.55 * measured[0], measured


def test_weight_is_quantized_once_per_optimizer_step():
    _, fp8 = _pair(dtype=torch.float32)
    opt = torch.optim.AdamW(fp8.parameters(), lr=1e-2)
    x = torch.randn(32, 256)
    for step in range(2):
        for _ in range(3):  # micro-batches of one step share the FP8 weight
            fp8(x).square().mean().backward()
        assert fp8.fp8_cache.builds == step + 1
        opt.step()
        opt.zero_grad()
    fresh = Fp8Linear(256, 384)
    fresh.load_state_dict(fp8.state_dict())
    # the same quantization and GEMM of the same weights and input: bitwise equal unless the weight differs
    assert torch.equal(fp8(x), fresh(x)), "a stale FP8 weight was used after optimizer.step()"
    assert fp8.fp8_cache.builds == 3


@pytest.mark.parametrize("change", ["sgd_foreach", "adamw_fused", "copy_", "data", "invalidate"])
def test_every_weight_change_invalidates_the_cache(change):
    _, fp8 = _pair(dtype=torch.float32)
    x = torch.randn(16, 256)
    before = fp8(x)
    fp8(x)
    assert fp8.fp8_cache.builds == 1
    if change == "sgd_foreach":
        before.sum().backward()
        torch.optim.SGD(fp8.parameters(), lr=1.0, foreach=True).step()
    elif change == "adamw_fused":  # updates parameters without advancing their version counters
        before.sum().backward()
        version = fp8.weight._version
        torch.optim.AdamW(fp8.parameters(), lr=1.0, fused=True).step()
        assert fp8.weight._version == version
    elif change == "copy_":
        with torch.no_grad():
            fp8.weight.copy_(torch.randn_like(fp8.weight))
    elif change == "data":
        fp8.weight.data = torch.randn_like(fp8.weight)
    else:
        assert invalidate_fp8_caches(nn.Sequential(fp8)) == 1
    after = fp8(x)
    assert fp8.fp8_cache.builds == 2
    # unchanged weights give the same bits (the same operations on the same inputs); changed ones cannot
    assert torch.equal(before, after) == (change == "invalidate")


def test_frozen_weight_and_input_without_grad():
    ref, fp8 = _pair()
    fp8.weight.requires_grad_(False)
    x = torch.randn(50, 256, dtype=torch.bfloat16, requires_grad=True)
    y = fp8(x)
    dx, = torch.autograd.grad(y.float().sum(), [x])
    dx_ref, = torch.autograd.grad(ref(x).float().sum(), [x])
    assert sqnr_db(dx_ref, dx) >= 25
    fp8.weight.requires_grad_(True)
    y = fp8(x.detach())
    y.float().sum().backward()
    assert fp8.weight.grad is not None


def test_drop_in_replacement_of_nn_linear():
    lin = nn.Linear(128, 64)
    fp8 = Fp8Linear.from_linear(lin)
    assert fp8.weight is lin.weight and fp8.bias is lin.bias
    assert isinstance(fp8, nn.Linear) and fp8.state_dict().keys() == lin.state_dict().keys()
    with pytest.raises(ValueError, match="divisible by 16"):
        Fp8Linear(100, 64)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(128)
        self.attn_proj = nn.Linear(128, 128)
        self.gate = nn.Linear(128, 8)  # MoE router
        self.up_proj = nn.Linear(128, 256)
        self.gate_proj = nn.Linear(128, 256)  # a SwiGLU projection, not a router: converted
        self.odd = nn.Linear(128, 100)
        self.mha = nn.MultiheadAttention(128, 4)  # its out_proj is an nn.Linear subclass


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 128)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(128, 64)
        self.shared = nn.Linear(128, 128)
        self.alias = self.shared


def test_convert_to_fp8_reports_what_it_did():
    model = _Model()
    params = list(model.parameters())
    report = convert_to_fp8(model, Fp8Recipe(pow2_scales=True), filter_fn=lambda name, m: "layers.1.up" not in name)
    assert set(report.converted) == {"layers.0.attn_proj", "layers.0.up_proj", "layers.0.gate_proj",
                                     "layers.1.attn_proj", "layers.1.gate_proj", "shared", "alias"}
    reasons = dict(report.skipped)
    assert "pattern 'lm_head'" in reasons["lm_head"]
    assert "pattern '*.gate'" in reasons["layers.0.gate"]
    assert reasons["layers.1.up_proj"] == "excluded by filter_fn"
    assert "out_features=100 not a multiple of 16" in reasons["layers.0.odd"]
    assert "subclasses nn.Linear" in reasons["layers.0.mha.out_proj"]
    assert isinstance(model.layers[0].up_proj, Fp8Linear) and model.layers[0].up_proj.recipe.pow2_scales
    assert model.alias is model.shared and isinstance(model.shared, Fp8Linear)
    assert list(model.parameters()) == params, "parameters must be the same objects (optimizers hold them)"
    assert "converted 7" in str(report)
    assert invalidate_fp8_caches(model) == 6
    assert model.layers[0].gate_proj(torch.randn(4, 128)).shape == (4, 256)
    again = convert_to_fp8(model)
    assert again.converted == ("layers.1.up_proj",) and dict(again.skipped)["shared"] == "already an Fp8Linear"


def test_recipe_validation():
    with pytest.raises(ValueError, match="block_size must be 128"):
        Fp8Recipe(block_size=64)
    with pytest.raises(ValueError, match="backend must be"):
        Fp8Recipe(backend="cublas")
    with pytest.raises(TypeError, match="tuple of patterns"):
        Fp8Recipe(high_precision="lm_head")


# ragged counts take the per-expert weight gradient; multiples of 128 the one grouped along the tokens
@pytest.mark.parametrize("sizes", [[100, 0, 37, 200], [128, 0, 256, 128]], ids=["ragged", "aligned"])
def test_grouped_linear_within_25_db_of_bf16_per_expert(sizes):
    torch.manual_seed(0)
    layer = Fp8GroupedLinear(4, 256, 128, dtype=torch.bfloat16)
    x = torch.randn(sum(sizes), 256, dtype=torch.bfloat16)
    dy = torch.randn(sum(sizes), 128, dtype=torch.bfloat16)
    starts = [sum(sizes[:e]) for e in range(len(sizes))]

    def reference(x_, w_):
        return torch.cat([x_[lo:lo + s] @ w_[e].T for e, (lo, s) in enumerate(zip(starts, sizes))])

    xr, wr = x.clone().requires_grad_(), layer.weight.detach().clone().requires_grad_()
    want = (reference(xr, wr), *torch.autograd.grad(reference(xr, wr), [xr, wr], dy))
    xf = x.clone().requires_grad_()
    y = layer(xf, torch.tensor(sizes))
    got = (y, *torch.autograd.grad(y, [xf, layer.weight], dy))
    for name, w, g in zip(["output", "input grad", "weight grad"], want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert sqnr_db(w, g) >= 25, f"{name}: {sqnr_db(w, g):.1f} dB"
    assert not got[2][1].any(), "an expert without tokens gets a zero gradient"
    with pytest.raises(ValueError, match=r"summing to x\.shape"):
        layer(x, [1, 2, 3, 4])


def test_triton_path_matches_reference_path():
    pytest.importorskip("triton")
    ref_mod = Fp8Linear(128, 256, dtype=torch.float32, recipe=Fp8Recipe(backend="reference", quant_backend="reference"))
    tri_mod = Fp8Linear(128, 256, dtype=torch.float32, recipe=Fp8Recipe(backend="triton", quant_backend="triton"))
    tri_mod.load_state_dict(ref_mod.state_dict())
    x = torch.randn(96, 128)
    dy = torch.randn(96, 256)
    for a, b in zip(_grads(ref_mod, x, dy), _grads(tri_mod, x, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_errors_name_the_layer_and_the_shapes():
    model = nn.Sequential(nn.Linear(128, 256, bias=False), nn.ReLU(), nn.Linear(256, 128, bias=False))
    convert_to_fp8(model, Fp8Recipe(backend="torch", quant_backend="reference"))  # no torch FP8 GEMM on a CPU
    x = torch.randn(4, 3, 128)
    with pytest.raises(RuntimeError, match=r"^Fp8Linear '0' \(in 128, out 256\), forward of an input of shape "
                                           r"\(4, 3, 128\) \(torch.float32\): no FP8 GEMM backend"):
        model(x)
    with pytest.raises(ValueError, match=r"^Fp8Linear '2' \(in 256, out 128\): the input must end in 256 features, "
                                         r"got shape \(4, 3, 128\)"):
        model[2](x)
    # an error of the backward names the layer and the gradient's shape
    layer = Fp8Linear(128, 256, bias=False, recipe=Fp8Recipe(backend="reference", quant_backend="reference"))
    y = layer(x.requires_grad_(True))
    y.grad_fn.recipe = Fp8Recipe(backend="torch", quant_backend="reference")  # the backward's own recipe
    with pytest.raises(RuntimeError, match=r"^Fp8Linear \(in 128, out 256\), backward of an output gradient of shape "
                                           r"\(4, 3, 256\)"):
        y.sum().backward()


@pytest.mark.parametrize("shape", [(256, 384), (3, 256, 130), (2, 200, 256), (0, 256, 384)],
                         ids=["dense", "stacked", "ragged_rows", "no_experts"])
def test_quantize_weight_writes_each_experts_transpose(shape):
    from dualflow.fp8.nn import _Fp8Weight, quantize_weight

    recipe = Fp8Recipe(quant_backend="reference")
    w = torch.randn(*shape)
    q, s = quantize_weight(w, recipe)
    with_t = quantize_weight(w, recipe, transposed=True)
    assert len(with_t) == 4
    assert_bitwise(q, with_t[0])
    assert_bitwise(s, with_t[1])
    made = _Fp8Weight(q, s).transposed()  # the transposing copy it replaces
    for got, want in zip(with_t[2:], made):
        assert_bitwise(want, got)
