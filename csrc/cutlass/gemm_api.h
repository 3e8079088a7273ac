// C ABI of the CUTLASS FP8 GEMMs of libdualflow_cuda, present when the library was built with CUTLASS
// (dualflow_build_info() says "cutlass=1"). Conventions of dualflow_cuda.h: every function returns a
// dualflow_status and leaves its message in dualflow_last_error(); device pointers and cudaStream_t
// cross as integers. All GEMMs compute D = A x B^T with FP8 E4M3 operands A [m, k] and B [n, k] (rows
// contiguous, leading dimensions in elements), FP32 accumulation and the scales applied every 128 of k.
//
// Scale layouts (FP32). "MN-major with leading dimension ld": the scale of row r and k-block kb is at
// [kb * ld + r], ld >= rows and a multiple of 4 (the transposed, padded layout the scale TMA loads).
// "K-major": [r * (k / 128) + kb], the FP8 engine's own layout.
//
// Every GEMM needs a device workspace of dualflow_cutlass_workspace_size() bytes (possibly 0) from the
// caller, so that the caller's allocator owns it.
#pragma once
#include "dualflow_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

// Number of compiled configurations.
DUALFLOW_API int dualflow_cutlass_config_count(int* count);

// Facts of configuration `index` (0 <= index < count): its name (NUL-terminated, truncated to
// name_len), kind (0: forward / input gradient, 1: weight gradient, 2: grouped, 3: k-grouped weight
// gradient), CTA tile m x n x k,
// cluster m x n, schedule (0: cooperative, 1: ping-pong). Output pointers may be NULL.
DUALFLOW_API int dualflow_cutlass_config_info(int index, char* name, size_t name_len, int* kind, int* tile_m,
                                              int* tile_n, int* tile_k, int* cluster_m, int* cluster_n,
                                              int* schedule);

// Host only, no GPU needed: validates a problem for configuration `config` (the library's checks and
// CUTLASS's can_implement) and returns the workspace bytes its launch needs. groups = 1 except for
// grouped configurations, whose operands are contiguous (lda = ldb = k, ldd = n, sfa_ld/sfb_ld unused).
// sfb_ld is used by weight-gradient configurations only.
DUALFLOW_API int dualflow_cutlass_workspace_size(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups,
                                                 int64_t lda, int64_t ldb, int64_t ldd, int64_t sfa_ld,
                                                 int64_t sfb_ld, int sm_count, size_t* bytes);

// Forward / input gradient: d (BF16 [m, n], leading dimension ldd) = A x B^T. sfa: A's 1x128 scales
// MN-major (sfa_ld); sfb: B's 128x128 block scales K-major [ceil(n/128), k/128].
DUALFLOW_API int dualflow_cutlass_gemm_fwd(const char* config, int64_t m, int64_t n, int64_t k, uintptr_t a,
                                           int64_t lda, uintptr_t sfa, int64_t sfa_ld, uintptr_t b, int64_t ldb,
                                           uintptr_t sfb, uintptr_t d, int64_t ldd, int sm_count,
                                           uintptr_t workspace, size_t workspace_bytes, uintptr_t stream);

// Weight gradient: d (FP32 [m, n], ldd) = A x B^T, or d += A x B^T when accumulate != 0. Both operands
// have 1x128 scales along k, MN-major (sfa_ld, sfb_ld).
DUALFLOW_API int dualflow_cutlass_gemm_wgrad(const char* config, int64_t m, int64_t n, int64_t k, uintptr_t a,
                                             int64_t lda, uintptr_t sfa, int64_t sfa_ld, uintptr_t b, int64_t ldb,
                                             uintptr_t sfb, int64_t sfb_ld, uintptr_t d, int64_t ldd,
                                             int accumulate, int sm_count, uintptr_t workspace,
                                             size_t workspace_bytes, uintptr_t stream);

// Grouped forward over contiguous groups of rows: for g < groups, rows [offsets[g], offsets[g+1]) of
// A [m, k] and D (BF16 [m, n]) form the GEMM with B[g] ([groups, n, k]). offsets: device int32
// (offsets_bytes 4) or int64 (8), groups + 1 entries, well formed when 0 <= offsets[g] <= offsets[g+1]
// <= m; read on the device only and clamped into [0, m], non-decreasing, so that malformed offsets never
// take the kernel outside A, D or the scales (they leave rows of D unspecified).
// errors: 0, or a device int64 [5] record {code, group, offsets[group], offsets[group+1], m} into which
// the first malformed group is written (code 1) when the record's code is still 0.
// sfa: group g's scales as an MN-major [k/128, m_g] block starting at element offsets[g] * k/128;
// sfb: [groups, ceil(n/128), k/128] K-major.
DUALFLOW_API int dualflow_cutlass_grouped_gemm(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups,
                                               uintptr_t a, uintptr_t sfa, uintptr_t b, uintptr_t sfb,
                                               uintptr_t offsets, int offsets_bytes, uintptr_t errors, uintptr_t d,
                                               int sm_count, uintptr_t workspace, size_t workspace_bytes,
                                               uintptr_t stream);

// Weight gradients grouped along k (the experts' tokens): for g < groups, columns [offsets[g], offsets[g+1])
// of A [m, k] (row stride lda) and B [n, k] (ldb) form d[g] (FP32 [groups, m, n] contiguous, overwritten)
// = A_g x B_g^T; a group without columns gets zeros. Both operands have 1x128 scales along k, MN-major
// with leading dimensions exactly m and n (sfa [k/128, m], sfb [k/128, n]; m and n multiples of 4).
// offsets: device int32/int64 [groups + 1], multiples of 128, non-decreasing within [0, k], read on the
// device only: clamped into [0, k], made non-decreasing and rounded down to multiples of 128, so that
// malformed offsets never take the kernel outside the operands (errors: as for the grouped GEMM, with k
// as the bound; a misaligned offset is not recorded, it leaves d[g] unspecified).
// dualflow_cutlass_workspace_size takes (m, n, k, groups, lda, ldb, ldd = n, sfa_ld = m, sfb_ld = n).
DUALFLOW_API int dualflow_cutlass_kgrouped_wgrad(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups,
                                                 uintptr_t a, int64_t lda, uintptr_t sfa, uintptr_t b, int64_t ldb,
                                                 uintptr_t sfb, uintptr_t offsets, int offsets_bytes,
                                                 uintptr_t errors, uintptr_t d, int sm_count, uintptr_t workspace,
                                                 size_t workspace_bytes, uintptr_t stream);

#ifdef __cplusplus
}
#endif
