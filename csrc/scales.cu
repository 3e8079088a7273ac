// Scale-layout conversions the GEMMs need, as single kernels (the same gathers in plain torch were ~19 small
// launches per grouped GEMM; dualflow/fp8/cutlass.py keeps them as the reference).
#include <cstdint>

#include "common.cuh"

namespace dualflow {
namespace {

__device__ __forceinline__ int64_t load_offset(const void* offsets, int elem, int64_t i) {
  return elem == 4 ? static_cast<int64_t>(static_cast<const int32_t*>(offsets)[i])
                   : static_cast<const int64_t*>(offsets)[i];
}

// floor division and modulo, as Python's // and % (malformed offsets make the dividend negative)
__device__ __forceinline__ int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// out[j] for j < rows * kb: group g's scales as an MN-major block [kb, m_g] starting at offsets[g] * kb.
// The group of j is an upper bound over offsets[1:] * kb, with the same binary search as torch.searchsorted
// (right=True), so that even unsorted offsets pick what the reference picks; reads are clamped into s.
__global__ void grouped_scales_kernel(const float* __restrict__ s, int64_t ssr, int64_t ssc, int64_t rows, int64_t kb,
                                      const void* __restrict__ offsets, int elem, int64_t groups,
                                      float* __restrict__ out) {
  const int64_t n = rows * kb;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = groups;  // over offsets[1 .. groups]
    while (lo < hi) {
      const int64_t mid = lo + ((hi - lo) >> 1);
      if (!(load_offset(offsets, elem, mid + 1) * kb > j)) lo = mid + 1;
      else hi = mid;
    }
    const int64_t g = lo < groups - 1 ? lo : groups - 1;
    const int64_t begin = load_offset(offsets, elem, g);
    int64_t size = load_offset(offsets, elem, g + 1) - begin;
    size = size < 1 ? 1 : size;
    const int64_t local = j - begin * kb;
    const int64_t q = floor_div(local, size);
    int64_t src = (begin + (local - q * size)) * kb + q;
    src = src < 0 ? 0 : (src > n - 1 ? n - 1 : src);
    out[j] = s[(src / kb) * ssr + (src % kb) * ssc];
  }
}

}  // namespace
}  // namespace dualflow

extern "C" {

int dualflow_grouped_scales_mn_major(uintptr_t s, int64_t rows, int64_t kb, int64_t ssr, int64_t ssc,
                                     uintptr_t offsets, int offset_bytes, int64_t groups, uintptr_t out,
                                     uintptr_t stream) {
  DF_REQUIRE(rows >= 0 && kb >= 0, "dualflow_grouped_scales_mn_major: negative size %lld x %lld",
             static_cast<long long>(rows), static_cast<long long>(kb));
  DF_REQUIRE(groups >= 1, "dualflow_grouped_scales_mn_major: groups must be >= 1, got %lld",
             static_cast<long long>(groups));
  DF_REQUIRE(offset_bytes == 4 || offset_bytes == 8,
             "dualflow_grouped_scales_mn_major: offsets must be int32 or int64 (4 or 8 bytes), got %d", offset_bytes);
  const int64_t n = rows * kb;
  if (n == 0) return DUALFLOW_OK;
  DF_REQUIRE(s && offsets && out && s % 4 == 0 && out % 4 == 0 && offsets % offset_bytes == 0,
             "dualflow_grouped_scales_mn_major: null or misaligned pointer");
  const int threads = 256;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 8192 ? blocks64 : 8192);
  dualflow::grouped_scales_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const float*>(s), ssr, ssc, rows, kb, reinterpret_cast<const void*>(offsets), offset_bytes,
      groups, reinterpret_cast<float*>(out));
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // extern "C"
