"""libdualflow_cuda: the loader's errors, the C ABI through ctypes, and (on a GPU) a real launch."""

from __future__ import annotations

import ctypes
import os
import shutil

import pytest
import torch

from dualflow import _cuda


def _library_expected() -> bool:
    """The build makes the library whenever nvcc exists, unless DUALFLOW_CUDA=OFF."""
    if os.environ.get("DUALFLOW_CUDA", "AUTO").upper() == "OFF":
        return False
    return shutil.which("nvcc") is not None or os.path.exists("/usr/local/cuda/bin/nvcc")


@pytest.fixture
def lib():
    if _cuda.library_path() is None:
        if _library_expected():
            pytest.fail("nvcc is present and DUALFLOW_CUDA is not OFF, but libdualflow_cuda was not built "
                        "(run `make build`)")
        pytest.skip("libdualflow_cuda not built (DUALFLOW_CUDA=OFF or no nvcc)")
    return _cuda.load()


def test_missing_library_says_where_it_looked_and_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setattr(_cuda, "candidate_paths", lambda: [tmp_path / "nope.so"])
    with pytest.raises(_cuda.CudaLibraryError) as err:
        _cuda.load.__wrapped__()
    text = str(err.value)
    assert "nope.so (absent)" in text
    assert "make build" in text and "DUALFLOW_CUDA_LIB" in text


def test_unloadable_file_is_reported(monkeypatch, tmp_path):
    bad = tmp_path / "libdualflow_cuda.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setattr(_cuda, "candidate_paths", lambda: [bad])
    with pytest.raises(_cuda.CudaLibraryError, match=r"not an ELF|invalid ELF|file too short"):
        _cuda.load.__wrapped__()


def test_env_var_path_comes_first(monkeypatch, tmp_path):
    monkeypatch.setenv(_cuda.ENV_PATH, str(tmp_path / "x.so"))
    assert _cuda.candidate_paths()[0] == tmp_path / "x.so"


def test_abi_and_build_info(lib):
    assert lib.dualflow_abi_version() == _cuda.ABI_VERSION
    info = _cuda.build_info()
    assert info.startswith("cuda="), info


def test_errors_carry_the_library_message(lib):
    with pytest.raises(_cuda.CudaLibraryError, match=r"n must be >= 0, got -5"):
        _cuda.call("dualflow_fill_u32", 0, -5, 0, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="4-byte aligned"):
        _cuda.call("dualflow_fill_u32", 2, 1, 0, 0)
    # Zero elements is a valid no-op and must not touch the GPU.
    _cuda.call("dualflow_fill_u32", 0, 0, 0, 0)


def test_grouped_scale_conversion_checks_its_arguments_before_the_gpu(lib):
    # every check runs on the host, before a launch: no GPU needed
    fn = lib.dualflow_grouped_scales_mn_major
    i64, ptr = ctypes.c_int64, ctypes.c_size_t
    fn.argtypes = [ptr, i64, i64, i64, i64, ptr, ctypes.c_int, i64, ptr, ptr]
    name = "dualflow_grouped_scales_mn_major"
    with pytest.raises(_cuda.CudaLibraryError, match="groups must be >= 1, got 0"):
        _cuda.call(name, 256, 4, 2, 2, 1, 512, 4, 0, 1024, 0)
    with pytest.raises(_cuda.CudaLibraryError, match=r"int32 or int64 \(4 or 8 bytes\), got 2"):
        _cuda.call(name, 256, 4, 2, 2, 1, 512, 2, 1, 1024, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="negative size"):
        _cuda.call(name, 256, -4, 2, 2, 1, 512, 4, 1, 1024, 0)
    with pytest.raises(_cuda.CudaLibraryError, match="null or misaligned pointer"):
        _cuda.call(name, 258, 4, 2, 2, 1, 512, 4, 1, 1024, 0)
    _cuda.call(name, 0, 0, 2, 2, 1, 0, 4, 1, 0, 0)  # nothing to convert: returns before any launch


def test_swiglu_quantizer_checks_its_arguments_before_the_gpu(lib):
    # every check runs on the host, before a launch: no GPU needed
    name = "dualflow_swiglu_quantize"
    i64, ptr, c_int = ctypes.c_int64, ctypes.c_size_t, ctypes.c_int
    getattr(lib, name).argtypes = [ptr, c_int, i64, i64, i64, ptr, i64, ptr, c_int, ptr, ptr, i64, i64, ptr, ptr,
                                   i64, i64, ctypes.c_float, c_int, ptr]

    def call(h=4096, dtype=0, rows=256, hidden=256, ldh=512, da=0, ldda=256, end=0, end_bytes=0, q=8192, s=16384):
        _cuda.call(name, h, dtype, rows, hidden, ldh, da, ldda, end, end_bytes, q, s, 2, 1, 32768, 65536, 2, 1,
                   1e-30, 0, 0)

    with pytest.raises(_cuda.CudaLibraryError, match="dtype must be 0"):
        call(dtype=2)
    with pytest.raises(_cuda.CudaLibraryError, match="negative size"):
        call(rows=-4)
    with pytest.raises(_cuda.CudaLibraryError, match="multiples of 4"):
        call(rows=254)
    with pytest.raises(_cuda.CudaLibraryError, match="the stride >= 2 \\* hidden"):
        call(ldh=256)
    with pytest.raises(_cuda.CudaLibraryError, match="the backward needs hidden a multiple of 128"):
        call(hidden=192, ldh=384, da=8192, ldda=192)
    with pytest.raises(_cuda.CudaLibraryError, match="h must be 8-byte aligned"):
        call(h=4100)
    with pytest.raises(_cuda.CudaLibraryError, match="end_bytes must be 0"):
        call(end=64, end_bytes=2)
    with pytest.raises(_cuda.CudaLibraryError, match="the outputs of each layout"):
        call(q=0)
    call(rows=0)  # nothing to compute: returns before any launch


def test_device_count_without_driver_is_an_error_not_a_crash(lib):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; covered by the gpu test")
    count = ctypes.c_int(-1)
    with pytest.raises(_cuda.CudaLibraryError, match="cudaGetDeviceCount"):
        _cuda.call("dualflow_device_count", ctypes.byref(count))


@pytest.mark.gpu
def test_kernel_launch_on_gpu(lib):
    count = ctypes.c_int(0)
    _cuda.call("dualflow_device_count", ctypes.byref(count))
    assert count.value == torch.cuda.device_count()
    out = torch.full((1 << 20,) , 7, dtype=torch.int32, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    _cuda.call("dualflow_fill_u32", out.data_ptr(), out.numel(), 0xDEADBEEF, stream)
    torch.cuda.synchronize()
    assert bool((out.view(torch.uint32) == 0xDEADBEEF).all())
