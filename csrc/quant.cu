// FP8 quantization of 16-bit activations read from memory (the tile machinery: quant_tile.cuh).
#include "quant_tile.cuh"

namespace dualflow {
namespace {

// x [rows, cols] with row stride ldx
template <typename T>
struct MemorySource {
  static constexpr int kMinCtas = 1;  // no cap: ptxas gives the kernel 64 registers or fewer (4 CTAs an SM)
  const T* x;
  int64_t ldx;
  struct Cursor {
    const T* p;
    int64_t ldx;
    __device__ __forceinline__ uint2 load() const { return *reinterpret_cast<const uint2*>(p); }
    __device__ __forceinline__ void next() { p += ldx; }
  };
  __device__ __forceinline__ Cursor at(int64_t row, int64_t col) const { return {x + row * ldx + col, ldx}; }
  __device__ __forceinline__ int64_t live_rows(int64_t rows) const { return rows; }
};

}  // namespace
}  // namespace dualflow

extern "C" {

int dualflow_quantize_act(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ldx, int layouts, uintptr_t q,
                          uintptr_t s, int64_t ssr, int64_t ssc, uintptr_t qt, uintptr_t st, int64_t sstr,
                          int64_t sstc, float amax_floor, int pow2, uintptr_t stream) {
  DF_REQUIRE(dtype == 0 || dtype == 1, "dualflow_quantize_act: dtype must be 0 (bfloat16) or 1 (float16), got %d",
             dtype);
  DF_REQUIRE(rows >= 0 && cols >= 0, "dualflow_quantize_act: negative size %lld x %lld",
             static_cast<long long>(rows), static_cast<long long>(cols));
  DF_REQUIRE(rows % 4 == 0 && cols % 4 == 0 && ldx % 4 == 0 && ldx >= cols,
             "dualflow_quantize_act: rows, cols and the row stride must be multiples of 4 (and the stride >= cols), "
             "got %lld x %lld with stride %lld", static_cast<long long>(rows), static_cast<long long>(cols),
             static_cast<long long>(ldx));
  DF_REQUIRE(x % 8 == 0, "dualflow_quantize_act: x must be 8-byte aligned");
  dualflow::QuantOut out;
  if (int rc = dualflow::quant_outputs("dualflow_quantize_act", layouts, q, s, ssr, ssc, qt, st, sstr, sstc, amax_floor,
                                       pow2, &out))
    return rc;
  DF_REQUIRE(rows / dualflow::kTile < 65535, "dualflow_quantize_act: %lld rows exceed the grid",
             static_cast<long long>(rows));
  if (rows == 0 || cols == 0) return DUALFLOW_OK;
  const auto cs = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0)
    dualflow::launch_layouts<__nv_bfloat16>(
        layouts, dualflow::MemorySource<__nv_bfloat16>{reinterpret_cast<const __nv_bfloat16*>(x), ldx}, rows, cols,
        out, cs);
  else
    dualflow::launch_layouts<__half>(
        layouts, dualflow::MemorySource<__half>{reinterpret_cast<const __half*>(x), ldx}, rows, cols, out, cs);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // extern "C"
