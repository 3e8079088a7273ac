"""MoE expert-parallel communication: dispatch/combine over torch.distributed or the CUDA kernels."""
