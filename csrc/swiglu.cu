// SwiGLU and its backward fused with the FP8 quantization of their results in both activation layouts at
// once (1x128 and 128x1, DeepSeek-V3's recipe for the MoE experts): the values are computed where they are
// loaded, rounded to the input's 16-bit type and quantized by the tile machinery of quant_tile.cuh, so
// that they never travel through memory in 16 bits.
//
// forward:  h [rows, 2H] = [gate | up]         ->  a = silu(gate) * up                     [rows, H]
// backward: h and da [rows, H]                 ->  dh = [da * up * silu'(gate) | da * silu(gate)]  [rows, 2H]
//
// The arithmetic is the reference's (dualflow/fp8/moe.py, FP32 torch operations in the same order):
// IEEE division and the accurate expf, each product and sum rounded on its own (the _rn intrinsics keep the
// compiler from contracting them into FMAs, which torch's separate kernels do not do).
#include "quant_tile.cuh"

namespace dualflow {
namespace {

// Registers capped for 4 CTAs an SM (64 a thread; a few bytes spill in the backward): on an H200 at
// 98304 x 1408 the forward took 0.320 ms and the backward 0.698, against 0.380 / 0.707 uncapped (100
// registers, 2 CTAs) and 0.375 / 0.796 at 3 CTAs (benchmarks/NOTES_gpu.md row 42).
constexpr int kSwigluMinCtas = 4;

template <typename T>
__device__ __forceinline__ uint32_t round_pack(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t round_pack<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t round_pack<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint2 load8(const void* p) { return *reinterpret_cast<const uint2*>(p); }

// The 4 values of 8 loaded bytes as floats
template <typename T>
__device__ __forceinline__ void unpack4(uint2 w, float (&f)[4]) {
  const float2 a = unpack<T>(w.x), b = unpack<T>(w.y);
  f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
}

template <typename T>
__device__ __forceinline__ uint2 pack4(const float (&f)[4]) {
  return make_uint2(round_pack<T>(f[0], f[1]), round_pack<T>(f[2], f[3]));
}

// 1 / (1 + exp(-g)) as torch computes sigmoid's pieces in the reference
__device__ __forceinline__ float sigmoid_ref(float g) { return __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-g))); }

__device__ __forceinline__ int64_t live_rows_of(int64_t rows, const void* end, int end_bytes) {
  if (end_bytes == 0) return rows;
  const int64_t e = end_bytes == 4 ? static_cast<int64_t>(*static_cast<const int32_t*>(end))
                                   : *static_cast<const int64_t*>(end);
  return e < rows ? e : rows;
}

// a = silu(gate) * up of h [rows, 2H] (row stride ldh); output column c reads gate column c and up column H + c
template <typename T>
struct SwigluSource {
  static constexpr int kMinCtas = kSwigluMinCtas;
  const T* h;
  int64_t ldh, hidden;
  const void* end;  // device scalar (int32 or int64 by end_bytes) or unused
  int end_bytes;
  struct Cursor {
    const T* p;
    int64_t ldh, hidden;
    __device__ __forceinline__ uint2 load() const {
      float g[4], u[4], a[4];
      unpack4<T>(load8(p), g);
      unpack4<T>(load8(p + hidden), u);
#pragma unroll
      for (int j = 0; j < 4; ++j) a[j] = __fmul_rn(__fdiv_rn(g[j], __fadd_rn(1.0f, expf(-g[j]))), u[j]);
      return pack4<T>(a);
    }
    __device__ __forceinline__ void next() { p += ldh; }
  };
  __device__ __forceinline__ Cursor at(int64_t row, int64_t col) const { return {h + row * ldh + col, ldh, hidden}; }
  __device__ __forceinline__ int64_t live_rows(int64_t rows) const { return live_rows_of(rows, end, end_bytes); }
};

// dh of h [rows, 2H] and da [rows, H]: output column c < H is the gate's gradient (gate, up and da at c),
// c >= H the up's (gate and da at c - H). H % 128 == 0, so a tile lies in one half and its branch is uniform.
template <typename T>
struct SwigluBackwardSource {
  static constexpr int kMinCtas = kSwigluMinCtas;
  const T* h;
  const T* da;
  int64_t ldh, ldda, hidden;
  const void* end;
  int end_bytes;
  struct Cursor {
    const T* ph;
    const T* pd;
    int64_t ldh, ldda, hidden;
    bool gate_half;
    __device__ __forceinline__ uint2 load() const {
      float g[4], d[4], out[4];
      unpack4<T>(load8(ph), g);
      unpack4<T>(load8(pd), d);
      if (gate_half) {  // da * up * (sig * (1 + gate * (1 - sig)))
        float u[4];
        unpack4<T>(load8(ph + hidden), u);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float sig = sigmoid_ref(g[j]);
          const float deriv = __fmul_rn(sig, __fadd_rn(1.0f, __fmul_rn(g[j], __fsub_rn(1.0f, sig))));
          out[j] = __fmul_rn(__fmul_rn(d[j], u[j]), deriv);
        }
      } else {  // da * (gate * sig)
#pragma unroll
        for (int j = 0; j < 4; ++j) out[j] = __fmul_rn(d[j], __fmul_rn(g[j], sigmoid_ref(g[j])));
      }
      return pack4<T>(out);
    }
    __device__ __forceinline__ void next() {
      ph += ldh;
      pd += ldda;
    }
  };
  __device__ __forceinline__ Cursor at(int64_t row, int64_t col) const {
    const bool gate_half = col < hidden;
    const int64_t c = gate_half ? col : col - hidden;
    return {h + row * ldh + c, da + row * ldda + c, ldh, ldda, hidden, gate_half};
  }
  __device__ __forceinline__ int64_t live_rows(int64_t rows) const { return live_rows_of(rows, end, end_bytes); }
};

template <typename T>
void launch_swiglu(uintptr_t h, int64_t rows, int64_t hidden, int64_t ldh, uintptr_t da, int64_t ldda, uintptr_t end,
                   int end_bytes, const QuantOut& out, cudaStream_t stream) {
  const auto* hp = reinterpret_cast<const T*>(h);
  const auto* ep = reinterpret_cast<const void*>(end);
  if (da == 0)
    launch_tiles<T, true, true>(SwigluSource<T>{hp, ldh, hidden, ep, end_bytes}, rows, hidden, out, stream);
  else
    launch_tiles<T, true, true>(
        SwigluBackwardSource<T>{hp, reinterpret_cast<const T*>(da), ldh, ldda, hidden, ep, end_bytes}, rows,
        2 * hidden, out, stream);
}

}  // namespace
}  // namespace dualflow

extern "C" {

int dualflow_swiglu_quantize(uintptr_t h, int dtype, int64_t rows, int64_t hidden, int64_t ldh, uintptr_t da,
                             int64_t ldda, uintptr_t end, int end_bytes, uintptr_t q, uintptr_t s,
                             int64_t ssr, int64_t ssc, uintptr_t qt, uintptr_t st, int64_t sstr, int64_t sstc,
                             float amax_floor, int pow2, uintptr_t stream) {
  const char* who = "dualflow_swiglu_quantize";
  DF_REQUIRE(dtype == 0 || dtype == 1, "%s: dtype must be 0 (bfloat16) or 1 (float16), got %d", who, dtype);
  DF_REQUIRE(rows >= 0 && hidden >= 0, "%s: negative size %lld x %lld", who, static_cast<long long>(rows),
             static_cast<long long>(hidden));
  DF_REQUIRE(rows % 4 == 0 && hidden % 4 == 0 && ldh % 4 == 0 && ldh >= 2 * hidden,
             "%s: rows, hidden and h's row stride must be multiples of 4 (the stride >= 2 * hidden), got %lld rows, "
             "hidden %lld, stride %lld", who, static_cast<long long>(rows), static_cast<long long>(hidden),
             static_cast<long long>(ldh));
  DF_REQUIRE(da == 0 || (hidden % dualflow::kTile == 0 && ldda % 4 == 0 && ldda >= hidden && da % 8 == 0),
             "%s: the backward needs hidden a multiple of %d and da 8-byte aligned with a row stride that is a "
             "multiple of 4 and >= hidden; got hidden %lld, stride %lld", who, dualflow::kTile,
             static_cast<long long>(hidden), static_cast<long long>(ldda));
  DF_REQUIRE(h % 8 == 0, "%s: h must be 8-byte aligned", who);
  DF_REQUIRE(end_bytes == 0 || ((end_bytes == 4 || end_bytes == 8) && end != 0 && end % end_bytes == 0),
             "%s: end_bytes must be 0 (no end) or 4 or 8 with an aligned device pointer end, got %d", who, end_bytes);
  dualflow::QuantOut out;
  if (int rc = dualflow::quant_outputs(who, 3, q, s, ssr, ssc, qt, st, sstr, sstc, amax_floor, pow2, &out))
    return rc;
  DF_REQUIRE(rows / dualflow::kTile < 65535, "%s: %lld rows exceed the grid", who, static_cast<long long>(rows));
  if (rows == 0 || hidden == 0) return DUALFLOW_OK;
  const auto cs = reinterpret_cast<cudaStream_t>(stream);
  if (dtype == 0)
    dualflow::launch_swiglu<__nv_bfloat16>(h, rows, hidden, ldh, da, ldda, end, end_bytes, out, cs);
  else
    dualflow::launch_swiglu<__half>(h, rows, hidden, ldh, da, ldda, end, end_bytes, out, cs);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // extern "C"
