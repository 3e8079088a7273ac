// C ABI of libdualflow_cuda. Every function returns 0 on success or a nonzero code; the message of the
// last failure on the calling thread is available from dualflow_last_error(). Device pointers, sizes and
// cudaStream_t values cross the boundary as integers so that callers need no CUDA or torch headers.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define DUALFLOW_API __attribute__((visibility("default")))

enum dualflow_status {
  DUALFLOW_OK = 0,
  DUALFLOW_ERR_INVALID_ARGUMENT = 1,
  DUALFLOW_ERR_CUDA = 2,
  DUALFLOW_ERR_TIMEOUT = 3,
  DUALFLOW_ERR_UNSUPPORTED = 4,
  DUALFLOW_ERR_INTERNAL = 5,
};

// Version of this ABI; the Python loader refuses a library whose version differs from its own.
DUALFLOW_API int dualflow_abi_version(void);
// Message of the last failure on this thread ("" when none).
DUALFLOW_API const char* dualflow_last_error(void);
// Compile-time facts: "cuda=13.0 archs=90a cutlass=1".
DUALFLOW_API int dualflow_build_info(char* buf, size_t len);
// Number of CUDA devices the runtime sees; fails (with the driver's reason) where there is no driver.
DUALFLOW_API int dualflow_device_count(int* count);
// Fills n uint32 words at ptr with value on the given stream: the smallest launch, used by the GPU tests
// to check that the library's kernels load and run on the device at hand.
DUALFLOW_API int dualflow_fill_u32(uintptr_t ptr, int64_t n, uint32_t value, uintptr_t stream);

// FP8 (E4M3) quantization of a 16-bit [rows, cols] tensor x (dtype 0: bfloat16, 1: float16; row stride ldx
// elements, unit column stride), on the given stream, in the layouts asked for (layouts: 1 the 1x128
// layout, 2 the 128x1 layout, 3 both from one read): 1x128 writes q [rows, cols] (contiguous FP8 bytes) and
// FP32 scales s [rows, ceil(cols/128)] (strides ssr, ssc); 128x1 writes qt [cols, rows] and st
// [cols, ceil(rows/128)] (strides sstr, sstc). The pointers of a layout not asked for are not read (0 is
// fine). rows, cols and ldx must be multiples of 4, x 8-byte and q, qt 4-byte aligned
// (DUALFLOW_ERR_INVALID_ARGUMENT otherwise). Scales are max(amax, amax_floor) / 448, rounded up to a power
// of two when pow2 is nonzero. The bits equal dualflow/fp8/quant.py's reference.
DUALFLOW_API int dualflow_quantize_act(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ldx, int layouts,
                                       uintptr_t q, uintptr_t s, int64_t ssr, int64_t ssc, uintptr_t qt, uintptr_t st,
                                       int64_t sstr, int64_t sstc, float amax_floor, int pow2, uintptr_t stream);

// SwiGLU (da == 0) or its backward, fused with the FP8 quantization of the result in both layouts of
// dualflow_quantize_act (its layouts = 3: the same outputs and scale strides; the result has hidden columns
// forward, 2 * hidden backward). h [rows, 2 * hidden] = [gate | up] with row stride ldh; the backward's da [rows, hidden] with
// row stride ldda, and hidden a multiple of 128. The value is computed in FP32 as dualflow/fp8/moe.py's
// reference does, rounded to h's dtype (0 bfloat16, 1 float16), then quantized. end: 0, or a device int32
// (end_bytes 4) or int64 (8) scalar; the 128-row tiles that start at or after it are skipped (their outputs
// stay unwritten). rows, hidden and the row strides must be multiples of 4, h and da 8-byte aligned.
DUALFLOW_API int dualflow_swiglu_quantize(uintptr_t h, int dtype, int64_t rows, int64_t hidden, int64_t ldh,
                                          uintptr_t da, int64_t ldda, uintptr_t end, int end_bytes, uintptr_t q,
                                          uintptr_t s, int64_t ssr, int64_t ssc, uintptr_t qt, uintptr_t st,
                                          int64_t sstr, int64_t sstc, float amax_floor, int pow2, uintptr_t stream);

// The 1x128 scales s [rows, kb] (strides ssr, ssc; FP32) of the grouped GEMMs' contiguous layout, rearranged
// for the grouped kernel: out (FP32, rows * kb) holds group g's scales as an MN-major block [kb, m_g] starting
// at element offsets[g] * kb, m_g = offsets[g + 1] - offsets[g]. offsets (int32 or int64 by offset_bytes,
// groups + 1 entries, on the device) are read on the device only; entries of out outside every group hold
// some scale of s (reads are clamped into s). Equal to dualflow/fp8/cutlass.py's grouped_scales_mn_major.
DUALFLOW_API int dualflow_grouped_scales_mn_major(uintptr_t s, int64_t rows, int64_t kb, int64_t ssr, int64_t ssc,
                                                  uintptr_t offsets, int offset_bytes, int64_t groups, uintptr_t out,
                                                  uintptr_t stream);

#ifdef __cplusplus
}
#endif
