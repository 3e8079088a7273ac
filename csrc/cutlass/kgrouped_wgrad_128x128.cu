// Configuration kgrouped_wgrad_128x128 of configs.h in its own translation unit, so that configurations compile in parallel.
#include "kernels.cuh"

DF_CUTLASS_INSTANTIATE(5, "kgrouped_wgrad_128x128")
