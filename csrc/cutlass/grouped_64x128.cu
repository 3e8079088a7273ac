// Configuration grouped_64x128 of configs.h in its own translation unit, so that configurations compile in parallel.
#include "kernels.cuh"

DF_CUTLASS_INSTANTIATE(4, "grouped_64x128")
