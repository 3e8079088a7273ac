"""Triton kernels of the FP8 engine (GPU; on CPU they run under TRITON_INTERPRET=1)."""
