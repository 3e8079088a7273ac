"""dualflow: DualPipe scheduling, fine-grained FP8 and MoE expert-parallel communication for PyTorch.

Subpackages are independent and imported on demand, so ``import dualflow.fp8`` loads nothing of the
others:

- ``dualflow.dualpipe``: pipeline schedules as data, simulator, rendering, runtime;
- ``dualflow.fp8``: block-scaled FP8 quantization, GEMMs and linear layers;
- ``dualflow.comm``: MoE dispatch/combine over torch.distributed or the CUDA kernels;
- ``dualflow.launcher``: torchrun/SLURM/MPI launch, environment normalisation, preflight, config;
- ``dualflow.train``: the end-to-end MoE training job;
- ``dualflow.utils``: NVTX ranges, timing, logging.
"""

__version__ = "0.1.0"
