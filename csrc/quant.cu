// The fused 1x128 + 128x1 FP8 quantizer of 16-bit activations: one read of x writes both layouts.
//
// A CTA of 8 warps takes a 128x128 tile. Row pass: each warp quantizes 16 rows, a row per instruction
// (32 lanes x 4 elements, 8-byte loads), its amax one redux.sync; the raw tile goes to shared memory.
// Column pass: each warp takes 8 column pairs and reads 4 consecutive rows a lane from shared memory, so a
// lane packs the 4 FP8 bytes of each column into one 32-bit store of `qt` (128 coalesced bytes a warp).
// The tile stays in its 16-bit type in shared memory (32 KB), the registers hold one row or column at a
// time: several CTAs an SM, where the Triton kernel's FP32 tile in registers allows two
// (benchmarks/NOTES_gpu.md rows 14 and 19).
//
// The arithmetic is the reference's (dualflow/fp8/quant.py) and the Triton kernel's, so the results are
// the same bits: scale = max(amax, floor) / 448 correctly rounded (NaN propagates: a NaN's |bits| order
// above Inf's), optionally rounded up to a power of two on its bits; q = satfinite_e4m3(x * (1 / scale))
// with both the reciprocal and the product correctly rounded.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "common.cuh"

namespace dualflow {
namespace {

constexpr int kTile = 128;
constexpr int kWarps = 8;
constexpr int kRowWords = kTile / 2;  // 32-bit words of a 16-bit row in shared memory

__device__ __forceinline__ float to_float(uint16_t bits, __nv_bfloat16*) { return __bfloat162float(__ushort_as_bfloat16(bits)); }
__device__ __forceinline__ float to_float(uint16_t bits, __half*) { return __half2float(__ushort_as_half(bits)); }

// The two 16-bit values of a 32-bit word as floats (low half first: the lower column)
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t w) {
  return make_float2(to_float(static_cast<uint16_t>(w & 0xFFFFu), static_cast<T*>(nullptr)),
                     to_float(static_cast<uint16_t>(w >> 16), static_cast<T*>(nullptr)));
}

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

__device__ __forceinline__ float scale_of(uint32_t amax_bits, uint32_t floor_bits, bool pow2) {
  const float amax = __uint_as_float(amax_bits > floor_bits ? amax_bits : floor_bits);
  float scale = __fdiv_rn(amax, 448.0f);
  if (pow2) {
    const uint32_t bits = __float_as_uint(scale), exponent = bits & 0x7F800000u;
    const bool inexact = (bits & 0x7FFFFFu) != 0 && exponent != 0x7F800000u;
    scale = __uint_as_float(inexact ? exponent + 0x800000u : bits);
  }
  return scale;
}

// 4 values times inv, saturated to E4M3, packed low byte first
__device__ __forceinline__ uint32_t pack_fp8(float a, float b, float c, float d, float inv) {
  const __nv_fp8x2_storage_t lo =
      __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(a, inv), __fmul_rn(b, inv)), __NV_SATFINITE, __NV_E4M3);
  const __nv_fp8x2_storage_t hi =
      __nv_cvt_float2_to_fp8x2(make_float2(__fmul_rn(c, inv), __fmul_rn(d, inv)), __NV_SATFINITE, __NV_E4M3);
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// The shared tile is 128 rows of 32 eight-byte units; row r's unit u sits at u ^ (r / 4 % 32). The row
// pass's 8-byte stores are conflict-free under any permutation; the column pass reads rows 4j..4j+3 in
// lane j, which the swizzle spreads over 16 banks (2-way conflicts) instead of one.
__device__ __forceinline__ int swizzled_word(int row, int word) {
  return row * kRowWords + ((((word >> 1) ^ ((row >> 2) & 31)) << 1) | (word & 1));
}

template <typename T, bool kPow2>
__global__ void __launch_bounds__(kWarps * 32) fused_1x128_128x1_kernel(
    const T* __restrict__ x, int64_t rows, int64_t cols, int64_t ldx, uint8_t* __restrict__ q,
    float* __restrict__ s, int64_t ssr, int64_t ssc, uint8_t* __restrict__ qt, float* __restrict__ st,
    int64_t sstr, int64_t sstc, uint32_t floor_bits) {
  __shared__ __align__(16) uint32_t tile[kTile * kRowWords];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col = c0 + 4 * lane;  // cols % 4 == 0: a lane's 4 columns are all inside or all outside
  const bool col_in = col < cols;

  // Row pass: rows warp*16 .. warp*16+15 of the tile, loads of the 16 rows issued before any use
  uint2 v[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t row = r0 + warp * 16 + i;
    v[i] = make_uint2(0u, 0u);
    if (col_in && row < rows) v[i] = *reinterpret_cast<const uint2*>(x + row * ldx + col);
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i;
    const int64_t row = r0 + r;
    *reinterpret_cast<uint2*>(&tile[swizzled_word(r, 2 * lane)]) = v[i];
    const float2 a = unpack<T>(v[i].x), b = unpack<T>(v[i].y);
    uint32_t m = max(max(abs_bits(a.x), abs_bits(a.y)), max(abs_bits(b.x), abs_bits(b.y)));
    m = __reduce_max_sync(0xFFFFFFFFu, m);
    if (row < rows) {
      const float scale = scale_of(m, floor_bits, kPow2);
      const float inv = __fdiv_rn(1.0f, scale);
      if (col_in) *reinterpret_cast<uint32_t*>(q + row * cols + col) = pack_fp8(a.x, a.y, b.x, b.y, inv);
      if (lane == 0) s[row * ssr + blockIdx.x * ssc] = scale;
    }
  }
  __syncthreads();

  // Column pass: column pairs warp*8 .. warp*8+7; lane j holds rows 4j..4j+3 of the pair
  const int64_t row = r0 + 4 * lane;  // rows % 4 == 0: a lane's 4 rows are all inside or all outside
#pragma unroll 2
  for (int p = warp * 8; p < warp * 8 + 8; ++p) {
    const int64_t c = c0 + 2 * p;
    if (c >= cols) break;  // warp-uniform
    float2 e[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) e[i] = unpack<T>(tile[swizzled_word(4 * lane + i, p)]);
    uint32_t m0 = max(max(abs_bits(e[0].x), abs_bits(e[1].x)), max(abs_bits(e[2].x), abs_bits(e[3].x)));
    uint32_t m1 = max(max(abs_bits(e[0].y), abs_bits(e[1].y)), max(abs_bits(e[2].y), abs_bits(e[3].y)));
    m0 = __reduce_max_sync(0xFFFFFFFFu, m0);
    m1 = __reduce_max_sync(0xFFFFFFFFu, m1);
    const float scale0 = scale_of(m0, floor_bits, kPow2), scale1 = scale_of(m1, floor_bits, kPow2);
    if (row < rows) {
      const float inv0 = __fdiv_rn(1.0f, scale0), inv1 = __fdiv_rn(1.0f, scale1);
      *reinterpret_cast<uint32_t*>(qt + c * rows + row) = pack_fp8(e[0].x, e[1].x, e[2].x, e[3].x, inv0);
      *reinterpret_cast<uint32_t*>(qt + (c + 1) * rows + row) = pack_fp8(e[0].y, e[1].y, e[2].y, e[3].y, inv1);
    }
    if (lane == 0) {
      st[c * sstr + blockIdx.y * sstc] = scale0;
      st[(c + 1) * sstr + blockIdx.y * sstc] = scale1;
    }
  }
}

template <typename T>
void launch(const void* x, int64_t rows, int64_t cols, int64_t ldx, void* q, void* s, int64_t ssr, int64_t ssc,
            void* qt, void* st, int64_t sstr, int64_t sstc, uint32_t floor_bits, bool pow2, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  auto kernel = pow2 ? fused_1x128_128x1_kernel<T, true> : fused_1x128_128x1_kernel<T, false>;
  kernel<<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), rows, cols, ldx, static_cast<uint8_t*>(q),
                                            static_cast<float*>(s), ssr, ssc, static_cast<uint8_t*>(qt),
                                            static_cast<float*>(st), sstr, sstc, floor_bits);
}

}  // namespace
}  // namespace dualflow

extern "C" {

int dualflow_quantize_1x128_128x1(uintptr_t x, int dtype, int64_t rows, int64_t cols, int64_t ldx, uintptr_t q,
                                  uintptr_t s, int64_t ssr, int64_t ssc, uintptr_t qt, uintptr_t st, int64_t sstr,
                                  int64_t sstc, float amax_floor, int pow2, uintptr_t stream) {
  DF_REQUIRE(dtype == 0 || dtype == 1, "dualflow_quantize_1x128_128x1: dtype must be 0 (bfloat16) or 1 (float16), "
             "got %d", dtype);
  DF_REQUIRE(rows >= 0 && cols >= 0, "dualflow_quantize_1x128_128x1: negative size %lld x %lld",
             static_cast<long long>(rows), static_cast<long long>(cols));
  DF_REQUIRE(rows % 4 == 0 && cols % 4 == 0 && ldx % 4 == 0 && ldx >= cols,
             "dualflow_quantize_1x128_128x1: rows, cols and the row stride must be multiples of 4 (and the stride "
             ">= cols), got %lld x %lld with stride %lld", static_cast<long long>(rows), static_cast<long long>(cols),
             static_cast<long long>(ldx));
  DF_REQUIRE(x % 8 == 0 && q % 4 == 0 && qt % 4 == 0,
             "dualflow_quantize_1x128_128x1: x must be 8-byte and q, qt 4-byte aligned");
  DF_REQUIRE(rows / dualflow::kTile < 65535, "dualflow_quantize_1x128_128x1: %lld rows exceed the grid",
             static_cast<long long>(rows));
  if (rows == 0 || cols == 0) return DUALFLOW_OK;
  uint32_t floor_bits;
  memcpy(&floor_bits, &amax_floor, 4);
  const auto cs = reinterpret_cast<cudaStream_t>(stream);
  auto* xp = reinterpret_cast<const void*>(x);
  auto *qp = reinterpret_cast<void*>(q), *sp = reinterpret_cast<void*>(s), *qtp = reinterpret_cast<void*>(qt),
       *stp = reinterpret_cast<void*>(st);
  if (dtype == 0)
    dualflow::launch<__nv_bfloat16>(xp, rows, cols, ldx, qp, sp, ssr, ssc, qtp, stp, sstr, sstc, floor_bits, pow2, cs);
  else
    dualflow::launch<__half>(xp, rows, cols, ldx, qp, sp, ssr, ssc, qtp, stp, sstr, sstc, floor_bits, pow2, cs);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // extern "C"
