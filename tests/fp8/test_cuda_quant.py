"""The ``cuda`` quantization backend where no GPU is: what it covers, and clear errors where it cannot run.
Its kernel's results are checked on a GPU (test_cuda_quant_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from dualflow.fp8 import Fp8Recipe, cuda_quant, quantize_1x128_and_128x1
from dualflow.fp8.quant import resolve_quant_backend


def test_the_recipe_takes_it_and_a_cpu_device_refuses_it_with_the_reason():
    assert Fp8Recipe(quant_backend="cuda").quant_backend == "cuda"
    with pytest.raises(RuntimeError, match="quantization backend 'cuda' cannot run here"):
        resolve_quant_backend("cuda", "cpu")
    with pytest.raises(RuntimeError, match="'cuda' cannot run here"):
        quantize_1x128_and_128x1(torch.randn(128, 128, dtype=torch.bfloat16), backend="cuda")
    assert cuda_quant.unavailable_reason("cpu") == "it runs on CUDA devices, not cpu"
    with pytest.raises(ValueError, match=r"expected one of \('auto', 'reference', 'triton', 'cuda'\)"):
        resolve_quant_backend("cudnn", "cpu")


@pytest.mark.parametrize(("shape", "dtype", "layout", "covered"), [
    ((1000, 1300), torch.bfloat16, (True, True, False), True),
    ((8, 4), torch.float16, (True, True, False), True),
    ((0, 256), torch.bfloat16, (True, True, False), True),
    ((1001, 1300), torch.bfloat16, (True, True, False), False),
    ((1000, 1302), torch.bfloat16, (True, True, False), False),
    ((1000, 1300), torch.float32, (True, True, False), False),
    ((1000, 1300), torch.bfloat16, (True, False, False), True),
    ((1000, 1300), torch.bfloat16, (False, True, False), True),
    ((1000, 1300), torch.bfloat16, (False, False, True), False),
    ((1000, 1300), torch.bfloat16, (True, False, True), False),
    ((1000, 1300), torch.bfloat16, (False, False, False), False),
], ids=str)
def test_what_the_kernel_covers(shape, dtype, layout, covered):
    x = torch.zeros(shape, dtype=dtype)
    assert (cuda_quant.why_not(x, *layout) is None) == covered


def test_strides_it_does_not_take():
    x = torch.zeros(64, 1302, dtype=torch.bfloat16)
    assert "row stride" in cuda_quant.why_not(x[:, :1300], True, True, False)  # stride 1302
    assert cuda_quant.why_not(torch.zeros(1304, 64, dtype=torch.bfloat16)[:1300].t(), True, True, False)  # transposed
    assert cuda_quant.why_not(torch.zeros(64, 1304, dtype=torch.bfloat16)[:, :1300], True, True, False) is None
    with pytest.raises(ValueError, match=r"does not take this input: .*float32"):
        cuda_quant.quantize(torch.zeros(8, 8), rowwise=True, colwise=True)
