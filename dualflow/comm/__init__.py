"""MoE expert-parallel communication: dispatch/combine over torch.distributed or the CUDA kernels.

The API follows DeepSeek's DeepEP "normal" mode (``Buffer``, ``get_dispatch_layout``, ``dispatch``,
``combine``) with deterministic results; see docs/comm.md.
"""

from dualflow.comm.buffer import Buffer, DispatchHandle
from dualflow.comm.kernels import CommTimeoutError, KernelConfig
from dualflow.comm.layout import DispatchLayout, ExpertMajorLayout, get_dispatch_layout
from dualflow.comm.work import CommWork

__all__ = ["Buffer", "CommTimeoutError", "CommWork", "DispatchHandle", "DispatchLayout", "ExpertMajorLayout",
           "KernelConfig", "get_dispatch_layout"]
