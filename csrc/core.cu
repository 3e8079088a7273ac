// Library-wide entry points: ABI version, error reporting, build facts and a minimal kernel.
#include <cstring>

#include "common.cuh"

#ifndef DUALFLOW_HAVE_CUTLASS
#define DUALFLOW_HAVE_CUTLASS 0
#endif

namespace dualflow {

namespace {
thread_local std::string g_last_error;  // per thread, so concurrent callers never see each other's errors
}

int set_error(int code, const char* fmt, ...) {
  char buf[1024];
  va_list args;
  va_start(args, fmt);
  vsnprintf(buf, sizeof(buf), fmt, args);
  va_end(args);
  g_last_error = buf;
  return code;
}

void clear_error() { g_last_error.clear(); }

namespace {
__global__ void fill_u32_kernel(uint32_t* __restrict__ out, int64_t n, uint32_t value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = value;
  }
}
}  // namespace

}  // namespace dualflow

extern "C" {

// 2: dualflow_cutlass_grouped_gemm takes the `errors` record of malformed offsets
// 3: dualflow_quantize_1x128_128x1
// 4: dualflow_quantize_act (every activation layout from one entry point)
// 5: dualflow_grouped_scales_mn_major
// 6: dualflow_swiglu_quantize
int dualflow_abi_version(void) { return 6; }

const char* dualflow_last_error(void) { return dualflow::g_last_error.c_str(); }

int dualflow_build_info(char* buf, size_t len) {
  DF_REQUIRE(buf != nullptr && len > 0, "dualflow_build_info: buf must be a non-empty buffer");
  snprintf(buf, len, "cuda=%d.%d cutlass=%d", CUDART_VERSION / 1000, (CUDART_VERSION % 1000) / 10,
           DUALFLOW_HAVE_CUTLASS);
  return DUALFLOW_OK;
}

int dualflow_device_count(int* count) {
  DF_REQUIRE(count != nullptr, "dualflow_device_count: count must not be NULL");
  *count = 0;
  DF_CUDA(cudaGetDeviceCount(count));
  return DUALFLOW_OK;
}

int dualflow_fill_u32(uintptr_t ptr, int64_t n, uint32_t value, uintptr_t stream) {
  DF_REQUIRE(n >= 0, "dualflow_fill_u32: n must be >= 0, got %lld", static_cast<long long>(n));
  DF_REQUIRE(ptr != 0 || n == 0, "dualflow_fill_u32: ptr is NULL");
  DF_REQUIRE(ptr % alignof(uint32_t) == 0, "dualflow_fill_u32: ptr must be 4-byte aligned");
  if (n == 0) return DUALFLOW_OK;
  const int threads = 256;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 4096 ? blocks64 : 4096);
  dualflow::fill_u32_kernel<<<blocks, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<uint32_t*>(ptr), n, value);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // extern "C"
