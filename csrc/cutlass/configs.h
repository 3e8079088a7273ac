// The compiled CUTLASS FP8 GEMM configurations and the problem description shared by the C ABI layer
// (api.cu) and the kernel translation units. Plain C++: no CUTLASS headers, so api.cu compiles fast.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace dualflow::cutlass_gemm {

// What a configuration computes (numbering shared with the C ABI's `kind` values).
//   Fwd:     D[M,N] (BF16) = A[M,K] x B[N,K]^T, A scaled per 1x128 tile, B per 128x128 block.
//   Wgrad:   D[M,N] (FP32) (+)= A[M,K] x B[N,K]^T, both scaled per 1x128 tile along K.
//   Grouped: Fwd per group of contiguous rows of A, each group with its own B[g].
//   KGroupedWgrad: Wgrad per group of contiguous columns (K = tokens) of A and B, each group writing its
//            own D[g] (FP32 [groups, M, N]): the experts' weight gradients, tokens grouped by expert.
enum class Kind : int { Fwd = 0, Wgrad = 1, Grouped = 2, KGroupedWgrad = 3 };
enum class Schedule : int { Cooperative = 0, Pingpong = 1 };

struct TileConfig {
  const char* name;
  Kind kind;
  Schedule schedule;
  int tile_m, tile_n, cluster_m, cluster_n;
};

inline constexpr int kTileK = 128;      // = the scale group along K: scales are promoted once per tile
inline constexpr int kScaleBlock = 128;  // 1x128 tiles and 128x128 blocks

// One translation unit per entry (csrc/cutlass/<name>.cu) instantiates it: keep this list short, each
// instantiation costs minutes of compile time. Order = index used by DF_CUTLASS_INSTANTIATE.
inline constexpr TileConfig kConfigs[] = {
    {"fwd_128x128", Kind::Fwd, Schedule::Cooperative, 128, 128, 1, 2},
    {"fwd_64x128", Kind::Fwd, Schedule::Pingpong, 64, 128, 1, 1},
    {"wgrad_128x128", Kind::Wgrad, Schedule::Cooperative, 128, 128, 1, 1},
    {"grouped_128x128", Kind::Grouped, Schedule::Cooperative, 128, 128, 1, 2},
    {"grouped_64x128", Kind::Grouped, Schedule::Pingpong, 64, 128, 1, 1},
    {"kgrouped_wgrad_128x128", Kind::KGroupedWgrad, Schedule::Cooperative, 128, 128, 1, 1},
};
inline constexpr int kNumConfigs = static_cast<int>(sizeof(kConfigs) / sizeof(kConfigs[0]));

constexpr bool same_name(const char* x, const char* y) {
  return *x == *y && (*x == '\0' || same_name(x + 1, y + 1));
}

// One GEMM call. Element (r, kb) of a scale matrix "MN-major with leading dimension ld" is at
// [kb * ld + r]; "K-major" at [r * ceil(K/128) + kb].
//
// KGroupedWgrad: k = the columns (tokens) of all groups together; a [m, k] and b [n, k] with row strides
// lda, ldb; group g owns columns [offsets[g], offsets[g+1]) (multiples of 128); sfa [k/128, m] and sfb
// [k/128, n] MN-major with ld = m and n exactly (the layout each group's block is described with); d
// FP32 [groups, m, n] contiguous, overwritten (a group without columns gets zeros).
struct Problem {
  int64_t m = 0, n = 0, k = 0;  // grouped: m = rows of all groups together; k-grouped: k = all columns
  int64_t groups = 1;
  const void* a = nullptr;  // FP8 E4M3 [m, k], row stride lda (grouped: contiguous)
  int64_t lda = 0;
  const void* b = nullptr;  // FP8 E4M3 [n, k], row stride ldb (grouped: [groups, n, k] contiguous)
  int64_t ldb = 0;
  // A's 1x128 scales. Dense: MN-major, ld = sfa_ld (a multiple of 4, >= m). Grouped: group g's block
  // [k/128, m_g] MN-major starts at element offsets[g] * k/128.
  const float* sfa = nullptr;
  int64_t sfa_ld = 0;
  // B's scales. Fwd: 128x128 blocks, K-major [ceil(n/128), k/128]; grouped: [groups, ceil(n/128), k/128];
  // wgrad: 1x128 tiles, MN-major with ld = sfb_ld (a multiple of 4, >= n).
  const float* sfb = nullptr;
  int64_t sfb_ld = 0;
  void* d = nullptr;  // fwd/grouped: BF16 [m, n]; wgrad: FP32 [m, n]; row stride ldd
  int64_t ldd = 0;
  bool accumulate = false;           // wgrad: d += A x B^T instead of d = A x B^T
  const void* offsets = nullptr;     // grouped: device int32/int64 [groups + 1] row offsets into A and D
                                     // (k-grouped: column offsets into A and B)
  int offsets_bytes = 4;             // 4 or 8
  // grouped, optional: device int64 [5] record of the first malformed group (gemm_api.h), or NULL
  int64_t* errors = nullptr;
  int sm_count = 0;                  // SMs of the device (persistent grid size), > 0
};

// Implemented once per configuration index by DF_CUTLASS_INSTANTIATE (kernels.cuh). Both return a
// dualflow_status and record a message on failure.
// Host only: checks the problem against the kernel (CUTLASS can_implement) and returns the workspace size.
template <int I>
int config_workspace(const Problem& p, size_t* bytes);
// Launches on `stream`; `workspace` is device memory of at least config_workspace() bytes.
template <int I>
int config_run(const Problem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace dualflow::cutlass_gemm
