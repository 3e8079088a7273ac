// The tile machinery of the FP8 activation quantizers of 16-bit values (csrc/quant.cu: values read from
// memory; csrc/swiglu.cu: values computed from SwiGLU's operands): the 1x128 layout, the 128x1 layout
// (written transposed), or both from one pass over the values.
//
// A CTA of 8 warps takes a 128x128 tile; each warp loads 16 of its rows (8-byte loads, a row per
// instruction). Row pass (1x128): each row's amax is one redux.sync. Column pass (128x1): the raw tile goes
// to shared memory; each warp takes 16 columns and reads 4 consecutive rows a lane, so a lane packs the 4
// FP8 bytes of a column into one 32-bit store of `qt` (128 coalesced bytes a warp). The tile stays in its
// 16-bit type in shared memory (32 KB), so 4 CTAs fit an SM where the Triton kernel's FP32 tile in
// registers allows two (benchmarks/NOTES_gpu.md rows 14, 19 and 25).
//
// Instructions, not bytes, limited the first version of this kernel (Nsight Compute: 84% of issue slots
// busy, 38% of DRAM bandwidth; NOTES_gpu row 26), so each element gets as few as the layout allows:
// - the amax is taken on the 16-bit patterns of |x|, two at a time (max.u16x2): non-negative floats order
//   like their bits, and NaN's patterns lie above Inf's, so the max propagates NaN. BF16 and FP16 widen
//   to FP32 exactly and monotonically, so this is the FP32 reference's amax;
// - a scale and its reciprocal cost two correctly rounded divisions (tens of instructions): a warp's 16
//   rows or columns get theirs together, one per lane, and the other lanes take them by shuffle, instead
//   of every lane dividing for every row.
//
// The arithmetic is the reference's (dualflow/fp8/quant.py) and the Triton kernel's, so the results are
// the same bits: scale = max(amax, floor) / 448 correctly rounded (NaN propagates), optionally rounded up
// to a power of two on its bits; q = satfinite_e4m3(x * (1 / scale)) with both the reciprocal and the
// product correctly rounded.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <cstring>

#include "common.cuh"

namespace dualflow {
namespace {

constexpr int kTile = 128;
constexpr int kWarps = 8;
constexpr int kRowWords = kTile / 2;  // 32-bit words of a 16-bit row in shared memory
constexpr uint32_t kAbs2 = 0x7FFF7FFFu;  // |x| of two packed 16-bit floats

template <typename T>
__device__ __forceinline__ float half_to_float(uint32_t bits16);
template <>
__device__ __forceinline__ float half_to_float<__nv_bfloat16>(uint32_t bits16) { return __uint_as_float(bits16 << 16); }
template <>
__device__ __forceinline__ float half_to_float<__half>(uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

// The two 16-bit values of a 32-bit word as floats (low half first: the lower column)
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t w) {
  return make_float2(half_to_float<T>(w & 0xFFFFu), half_to_float<T>(w >> 16));
}

// The larger of the two 16-bit patterns of a word of |x| pairs (its lanes' max, on which redux.sync runs)
__device__ __forceinline__ uint32_t fold(uint32_t m2) { return max(m2 & 0xFFFFu, m2 >> 16); }

// Scale of a group from the 16-bit pattern of its amax
template <typename T, bool kPow2>
__device__ __forceinline__ float scale_of(uint32_t amax16, uint32_t floor_bits) {
  const uint32_t bits = __float_as_uint(half_to_float<T>(amax16));  // NaN stays above Inf and every number
  const float amax = __uint_as_float(bits > floor_bits ? bits : floor_bits);
  float scale = __fdiv_rn(amax, 448.0f);
  if (kPow2) {
    const uint32_t sb = __float_as_uint(scale), exponent = sb & 0x7F800000u;
    const bool inexact = (sb & 0x7FFFFFu) != 0 && exponent != 0x7F800000u;
    scale = __uint_as_float(inexact ? exponent + 0x800000u : sb);
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

// The shared tile is 128 rows of 32 eight-byte units (4 columns each); row r's unit u sits at
// u ^ (r / 4 % 32). The row pass's stores (a row, 32 units) and the column pass's loads (one unit of rows
// 4j..4j+3 in lane j) then each touch 32 distinct units of one row or of 32 rows: 2 wavefronts, the
// fewest for 256 bytes.
__device__ __forceinline__ int swizzled_unit(int row, int unit) {
  return row * (kRowWords / 2) + (unit ^ ((row >> 2) & 31));
}

// One 128x128 tile of the values `src` gives (Source: at(row, col) returns a cursor whose load() gives the
// 4 packed 16-bit values at columns col..col+3 of its row and whose next() steps a row). kFull: the tile
// lies inside [rows, cols], so no row or column is checked (every tile but the last row and column of
// tiles); the pointers advance by a row or a column per step instead of being recomputed in 64-bit from
// indices (the address arithmetic and bounds checks were about a quarter of the kernel's PTX instructions).
template <typename T, bool kPow2, bool kRow, bool kCol, bool kFull, class Source>
__device__ __forceinline__ void quantize_tile(
    uint2* tile, const Source& src, int64_t rows, int64_t cols, uint8_t* __restrict__ q,
    float* __restrict__ s, int64_t ssr, int64_t ssc, uint8_t* __restrict__ qt, float* __restrict__ st,
    int64_t sstr, int64_t sstc, uint32_t floor_bits, int64_t r0, int64_t c0) {
  constexpr unsigned kAll = 0xFFFFFFFFu;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row0 = r0 + warp * 16;  // this warp's 16 rows
  const int64_t col = c0 + 4 * lane;    // cols % 4 == 0: a lane's 4 columns are all inside or all outside
  const bool col_in = kFull || col < cols;
  // rows of the warp inside x (<= 0: none)
  const int row_end = kFull || rows - row0 >= 16 ? 16 : static_cast<int>(rows - row0);

  // rows row0 .. row0+15 of the tile, all 16 loads issued before any use
  uint2 v[16];
  auto cursor = src.at(row0, col);
#pragma unroll
  for (int i = 0; i < 16; ++i, cursor.next()) {
    v[i] = make_uint2(0u, 0u);
    if (kFull || (col_in && i < row_end)) v[i] = cursor.load();
  }
  if (kCol) {
#pragma unroll
    for (int i = 0; i < 16; ++i) tile[swizzled_unit(warp * 16 + i, lane)] = v[i];
  }

  if (kRow) {
    uint32_t mine = 0;  // lane i < 16: the amax of row row0+i
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const uint32_t m = __reduce_max_sync(kAll, fold(__vmaxu2(v[i].x & kAbs2, v[i].y & kAbs2)));
      if (lane == i) mine = m;
    }
    const float scale = scale_of<T, kPow2>(mine, floor_bits);
    const float inv = __frcp_rn(scale);
    if (lane < 16 && (kFull || lane < row_end)) s[(row0 + lane) * ssr + blockIdx.x * ssc] = scale;
    uint8_t* qp = q + row0 * cols + col;
#pragma unroll
    for (int i = 0; i < 16; ++i, qp += cols) {
      const float inv_i = __shfl_sync(kAll, inv, i);
      if (kFull || (col_in && i < row_end)) {
        const float2 a = unpack<T>(v[i].x), b = unpack<T>(v[i].y);
        *reinterpret_cast<uint32_t*>(qp) = pack_fp8(a.x, a.y, b.x, b.y, inv_i);
      }
    }
  }

  if (kCol) {
    __syncthreads();
    // columns c0 + 16*warp .. +15 (units 4*warp .. 4*warp+3); lane j holds rows 4j..4j+3 of the tile
    const bool row_in = kFull || r0 + 4 * lane < rows;  // rows % 4 == 0: all 4 rows inside or all outside
    const int64_t cols_left = cols - c0 - 16 * warp;  // of this warp's 16 columns, those inside x (<= 0: none)
    const int col_end = kFull || cols_left >= 16 ? 16 : static_cast<int>(cols_left);
    uint2 e[4][4];
    uint32_t mine = 0;  // lane k < 16: the amax of column c0 + 16*warp + k
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        e[u][i] = tile[swizzled_unit(4 * lane + i, 4 * warp + u)];
        lo = __vmaxu2(lo, e[u][i].x & kAbs2);
        hi = __vmaxu2(hi, e[u][i].y & kAbs2);
      }
      const uint32_t m0 = __reduce_max_sync(kAll, lo & 0xFFFFu), m1 = __reduce_max_sync(kAll, lo >> 16);
      const uint32_t m2 = __reduce_max_sync(kAll, hi & 0xFFFFu), m3 = __reduce_max_sync(kAll, hi >> 16);
      mine = lane == 4 * u ? m0 : lane == 4 * u + 1 ? m1 : lane == 4 * u + 2 ? m2 : lane == 4 * u + 3 ? m3 : mine;
    }
    const float scale = scale_of<T, kPow2>(mine, floor_bits);
    const float inv = __frcp_rn(scale);
    if (lane < 16 && (kFull || lane < col_end)) st[(c0 + 16 * warp + lane) * sstr + blockIdx.y * sstc] = scale;
    uint8_t* qtp = qt + (c0 + 16 * warp) * rows + r0 + 4 * lane;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      float f[4][4];  // [row][column of the unit]
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 a = unpack<T>(e[u][i].x), b = unpack<T>(e[u][i].y);
        f[i][0] = a.x; f[i][1] = a.y; f[i][2] = b.x; f[i][3] = b.y;
      }
#pragma unroll
      for (int k = 0; k < 4; ++k, qtp += rows) {
        const float inv_k = __shfl_sync(kAll, inv, 4 * u + k);
        if (kFull || (row_in && 4 * u + k < col_end))
          *reinterpret_cast<uint32_t*>(qtp) = pack_fp8(f[0][k], f[1][k], f[2][k], f[3][k], inv_k);
      }
    }
  }
}

// The tiles of a [rows, cols] grid of `src`'s values (grid: x = column tiles, y = row tiles); tiles from
// src.live_rows(rows) on are skipped (their outputs stay undefined). Source::kMinCtas: the CTAs an SM must
// hold at once (registers are capped to allow them).
template <typename T, bool kPow2, bool kRow, bool kCol, class Source>
__global__ void __launch_bounds__(kWarps * 32, Source::kMinCtas) tile_kernel(
    Source src, int64_t rows, int64_t cols, uint8_t* __restrict__ q, float* __restrict__ s, int64_t ssr,
    int64_t ssc, uint8_t* __restrict__ qt, float* __restrict__ st, int64_t sstr, int64_t sstc, uint32_t floor_bits) {
  __shared__ __align__(16) uint2 tile[kCol ? kTile * kRowWords / 2 : 1];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  if (r0 >= src.live_rows(rows)) return;
  if (r0 + kTile <= rows && c0 + kTile <= cols)
    quantize_tile<T, kPow2, kRow, kCol, true>(tile, src, rows, cols, q, s, ssr, ssc, qt, st, sstr, sstc, floor_bits,
                                              r0, c0);
  else
    quantize_tile<T, kPow2, kRow, kCol, false>(tile, src, rows, cols, q, s, ssr, ssc, qt, st, sstr, sstc,
                                               floor_bits, r0, c0);
}

// The outputs of one quantization (a layout's pointers are null when it is not asked for)
struct QuantOut {
  void *q, *s;
  int64_t ssr, ssc;
  void *qt, *st;
  int64_t sstr, sstc;
  uint32_t floor_bits;
  bool pow2;
};

// Checks the outputs of `layouts` (1, 2 or 3) as a C ABI entry point `who` receives them and fills `out`.
inline int quant_outputs(const char* who, int layouts, uintptr_t q, uintptr_t s, int64_t ssr, int64_t ssc, uintptr_t qt,
                         uintptr_t st, int64_t sstr, int64_t sstc, float amax_floor, int pow2, QuantOut* out) {
  DF_REQUIRE(layouts >= 1 && layouts <= 3, "%s: layouts must be 1 (1x128), 2 (128x1) or 3 (both), got %d", who,
             layouts);
  const bool row = layouts & 1, col = layouts & 2;
  DF_REQUIRE((!row || (q % 4 == 0 && q && s)) && (!col || (qt % 4 == 0 && qt && st)),
             "%s: the outputs of each layout asked for must be given, q and qt 4-byte aligned", who);
  uint32_t floor_bits;
  memcpy(&floor_bits, &amax_floor, 4);
  *out = QuantOut{reinterpret_cast<void*>(q), reinterpret_cast<void*>(s), ssr, ssc, reinterpret_cast<void*>(qt),
                  reinterpret_cast<void*>(st), sstr, sstc, floor_bits, pow2 != 0};
  return DUALFLOW_OK;
}

template <typename T, bool kRow, bool kCol, class Source>
void launch_tiles(const Source& src, int64_t rows, int64_t cols, const QuantOut& o, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  auto kernel = o.pow2 ? tile_kernel<T, true, kRow, kCol, Source> : tile_kernel<T, false, kRow, kCol, Source>;
  kernel<<<grid, kWarps * 32, 0, stream>>>(src, rows, cols, static_cast<uint8_t*>(o.q), static_cast<float*>(o.s),
                                            o.ssr, o.ssc, static_cast<uint8_t*>(o.qt), static_cast<float*>(o.st),
                                            o.sstr, o.sstc, o.floor_bits);
}

// layouts: 1 (1x128), 2 (128x1) or 3 (both)
template <typename T, class Source>
void launch_layouts(int layouts, const Source& src, int64_t rows, int64_t cols, const QuantOut& o,
                    cudaStream_t stream) {
  if (layouts == 1) launch_tiles<T, true, false>(src, rows, cols, o, stream);
  else if (layouts == 2) launch_tiles<T, false, true>(src, rows, cols, o, stream);
  else launch_tiles<T, true, true>(src, rows, cols, o, stream);
}

}  // namespace
}  // namespace dualflow
