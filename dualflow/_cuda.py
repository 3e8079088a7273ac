"""Lazy ctypes loader of ``libdualflow_cuda``, the project's CUDA code behind a C ABI.

Nothing here runs at import time: the library is opened on the first call of :func:`load`, so a user
without a GPU (or without the library built) never touches this path unless they ask for a CUDA
backend. Every C function returns a status code; :func:`call` turns a nonzero code into
:class:`CudaLibraryError` carrying the library's own message.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

ABI_VERSION = 6  # must equal dualflow_abi_version() of csrc/core.cu
LIBRARY_NAME = "libdualflow_cuda.so"
ENV_PATH = "DUALFLOW_CUDA_LIB"

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_BUILD = _PACKAGE_DIR.parent / "build" / "cuda" / LIBRARY_NAME


class CudaLibraryError(RuntimeError):
    """Raised when libdualflow_cuda is missing, cannot be loaded, or a call into it fails."""


def candidate_paths() -> list[Path]:
    """Where the library is looked for, in order: $DUALFLOW_CUDA_LIB, the installed package, the checkout's build."""
    paths = []
    if os.environ.get(ENV_PATH):
        paths.append(Path(os.environ[ENV_PATH]))
    paths += [_PACKAGE_DIR / LIBRARY_NAME, _REPO_BUILD]
    return paths


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    lib.dualflow_abi_version.restype = c.c_int
    lib.dualflow_abi_version.argtypes = []
    lib.dualflow_last_error.restype = c.c_char_p
    lib.dualflow_last_error.argtypes = []
    lib.dualflow_build_info.argtypes = [c.c_char_p, c.c_size_t]
    lib.dualflow_device_count.argtypes = [c.POINTER(c.c_int)]
    lib.dualflow_fill_u32.argtypes = [c.c_size_t, c.c_int64, c.c_uint32, c.c_size_t]


@functools.cache
def load() -> ctypes.CDLL:
    """Open the library (once per process) and check its ABI version.

    Raises :class:`CudaLibraryError` saying where it looked and how to build it when it is missing.
    """
    tried = []
    for path in candidate_paths():
        if not path.is_file():
            tried.append(f"{path} (absent)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as exc:
            tried.append(f"{path} ({exc})")
            continue
        _declare(lib)
        version = lib.dualflow_abi_version()
        if version != ABI_VERSION:
            raise CudaLibraryError(
                f"{path} has ABI version {version}, this dualflow expects {ABI_VERSION}: "
                "rebuild it with `make build` (or reinstall the package)"
            )
        return lib
    raise CudaLibraryError(
        "libdualflow_cuda is not available. Looked in:\n  "
        + "\n  ".join(tried)
        + "\nBuild it with `make build` in a checkout (needs nvcc; CUTLASS headers come from "
        "`pip install nvidia-cutlass`), install the package with `pip install .` on a machine with the "
        f"CUDA toolkit, or point ${ENV_PATH} at a built library."
    )


def is_available() -> bool:
    """True when the library can be loaded (no GPU is needed for that)."""
    try:
        load()
    except CudaLibraryError:
        return False
    return True


def call(name: str, *args) -> None:
    """Call C function ``name``; raise :class:`CudaLibraryError` with the library's message on failure."""
    lib = load()
    rc = getattr(lib, name)(*args)
    if rc != 0:
        message = lib.dualflow_last_error().decode(errors="replace")
        raise CudaLibraryError(f"{name} failed (status {rc}): {message}")


def build_info() -> str:
    """Facts the library was compiled with, such as ``cuda=13.0 cutlass=1``."""
    buf = ctypes.create_string_buffer(256)
    call("dualflow_build_info", buf, len(buf))
    return buf.value.decode()


def library_path() -> Path | None:
    """Path of the library that :func:`load` opens, or None when there is none."""
    for path in candidate_paths():
        if path.is_file():
            return path
    return None
