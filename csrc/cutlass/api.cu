// C ABI of the CUTLASS FP8 GEMMs: configuration lookup, argument validation (before anything reaches
// CUTLASS or the GPU) and dispatch to the per-configuration translation units.
#include <array>
#include <climits>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

#include "common.cuh"
#include "configs.h"
#include "gemm_api.h"

namespace dualflow::cutlass_gemm {
namespace {

struct Entry {
  int (*workspace)(const Problem&, size_t*);
  int (*run)(const Problem&, void*, size_t, cudaStream_t);
};

template <size_t... I>
constexpr std::array<Entry, sizeof...(I)> make_entries(std::index_sequence<I...>) {
  return {Entry{&config_workspace<static_cast<int>(I)>, &config_run<static_cast<int>(I)>}...};
}
constexpr auto kEntries = make_entries(std::make_index_sequence<kNumConfigs>{});

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::Fwd: return "forward/input-gradient";
    case Kind::Wgrad: return "weight-gradient";
    case Kind::Grouped: return "grouped";
    case Kind::KGroupedWgrad: return "k-grouped weight-gradient";
  }
  return "?";
}

std::string names_of(Kind kind) {
  std::string names;
  for (const TileConfig& c : kConfigs) {
    if (c.kind != kind) continue;
    if (!names.empty()) names += ", ";
    names += c.name;
  }
  return names;
}

// Index of configuration `name`, which must compute `kind`; -1 with the error recorded otherwise.
int find_config(const char* name, Kind kind) {
  if (name == nullptr) name = "(null)";
  for (int i = 0; i < kNumConfigs; ++i) {
    if (std::strcmp(kConfigs[i].name, name) != 0) continue;
    if (kConfigs[i].kind == kind) return i;
    set_error(DUALFLOW_ERR_INVALID_ARGUMENT, "configuration '%s' is a %s GEMM, this call needs a %s one: %s", name,
              kind_name(kConfigs[i].kind), kind_name(kind), names_of(kind).c_str());
    return -1;
  }
  set_error(DUALFLOW_ERR_INVALID_ARGUMENT, "unknown CUTLASS configuration '%s'; %s configurations: %s", name,
            kind_name(kind), names_of(kind).c_str());
  return -1;
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Sizes, leading dimensions and (when `with_pointers`) pointers of a problem; the messages name the
// C arguments.
int validate(const TileConfig& c, const Problem& p, bool with_pointers) {
  const char* name = c.name;
  const auto ll = [](int64_t x) { return static_cast<long long>(x); };
  DF_REQUIRE(p.m >= 1 && p.n >= 1 && p.k >= 1, "%s: m, n, k must be >= 1, got m=%lld n=%lld k=%lld", name, ll(p.m),
             ll(p.n), ll(p.k));
  DF_REQUIRE(p.m <= INT_MAX && p.n <= INT_MAX && p.k <= INT_MAX,
             "%s: m, n, k must be < 2^31 (CUTLASS problem shapes are int), got m=%lld n=%lld k=%lld", name, ll(p.m),
             ll(p.n), ll(p.k));
  DF_REQUIRE(p.k % kScaleBlock == 0, "%s: k must be a multiple of %d (the scale block along k), got %lld", name,
             kScaleBlock, ll(p.k));
  DF_REQUIRE(p.sm_count >= 1, "%s: sm_count must be the device's number of SMs (>= 1), got %d", name, p.sm_count);
  const int64_t d_bytes = c.kind == Kind::Wgrad || c.kind == Kind::KGroupedWgrad ? 4 : 2;
  if (c.kind == Kind::KGroupedWgrad) {
    DF_REQUIRE(p.groups >= 1 && p.groups <= INT_MAX, "%s: groups must be in [1, 2^31), got %lld", name,
               ll(p.groups));
    DF_REQUIRE(p.ldd == p.n, "%s: d must be contiguous [groups, m, n] (ldd = n = %lld), got ldd=%lld", name, ll(p.n),
               ll(p.ldd));
    // each group's scale block is described as [k_g/128, m] (and [k_g/128, n]) MN-major: the leading
    // dimensions are m and n exactly, and a block starts 16-byte aligned only when they are multiples of 4
    DF_REQUIRE(p.sfa_ld == p.m && p.sfb_ld == p.n && p.m % 4 == 0 && p.n % 4 == 0,
               "%s: the scales must be MN-major with sfa_ld = m and sfb_ld = n, both multiples of 4; got m=%lld "
               "n=%lld sfa_ld=%lld sfb_ld=%lld",
               name, ll(p.m), ll(p.n), ll(p.sfa_ld), ll(p.sfb_ld));
  } else if (c.kind == Kind::Grouped) {
    DF_REQUIRE(p.groups >= 1 && p.groups <= INT_MAX, "%s: groups must be in [1, 2^31), got %lld", name,
               ll(p.groups));
    DF_REQUIRE(p.lda == p.k && p.ldb == p.k && p.ldd == p.n,
               "%s: grouped operands must be contiguous (lda = ldb = k = %lld, ldd = n = %lld), got lda=%lld "
               "ldb=%lld ldd=%lld",
               name, ll(p.k), ll(p.n), ll(p.lda), ll(p.ldb), ll(p.ldd));
  } else {
    DF_REQUIRE(p.groups == 1, "%s: groups must be 1 for a dense GEMM, got %lld", name, ll(p.groups));
    DF_REQUIRE(p.sfa_ld >= p.m && p.sfa_ld % 4 == 0,
               "%s: sfa_ld must be >= m = %lld and a multiple of 4 (scales of A MN-major, padded), got %lld", name,
               ll(p.m), ll(p.sfa_ld));
  }
  if (c.kind == Kind::Wgrad) {
    DF_REQUIRE(p.sfb_ld >= p.n && p.sfb_ld % 4 == 0,
               "%s: sfb_ld must be >= n = %lld and a multiple of 4 (scales of B MN-major, padded), got %lld", name,
               ll(p.n), ll(p.sfb_ld));
  }
  DF_REQUIRE(p.lda >= p.k && p.lda % 16 == 0, "%s: lda must be >= k = %lld and a multiple of 16, got %lld", name,
             ll(p.k), ll(p.lda));
  DF_REQUIRE(p.ldb >= p.k && p.ldb % 16 == 0, "%s: ldb must be >= k = %lld and a multiple of 16, got %lld", name,
             ll(p.k), ll(p.ldb));
  DF_REQUIRE(p.ldd >= p.n && (p.ldd * d_bytes) % 16 == 0,
             "%s: ldd must be >= n = %lld and a multiple of %lld (16-byte rows of D), got %lld", name, ll(p.n),
             ll(16 / d_bytes), ll(p.ldd));
  if (!with_pointers) return DUALFLOW_OK;
  DF_REQUIRE(p.a && p.b && p.d && p.sfa && p.sfb, "%s: a, b, d, sfa and sfb must not be NULL", name);
  DF_REQUIRE(aligned(p.a, 16) && aligned(p.b, 16) && aligned(p.d, 16) && aligned(p.sfa, 16),
             "%s: a, b, d and sfa must be 16-byte aligned (TMA), got a=%p b=%p d=%p sfa=%p", name, p.a, p.b, p.d,
             static_cast<const void*>(p.sfa));
  DF_REQUIRE(aligned(p.sfb, 4), "%s: sfb must be 4-byte aligned, got %p", name, static_cast<const void*>(p.sfb));
  if (c.kind == Kind::Grouped || c.kind == Kind::KGroupedWgrad) {
    DF_REQUIRE(p.offsets_bytes == 4 || p.offsets_bytes == 8, "%s: offsets_bytes must be 4 or 8, got %d", name,
               p.offsets_bytes);
    DF_REQUIRE(p.offsets && aligned(p.offsets, static_cast<size_t>(p.offsets_bytes)),
               "%s: offsets must be a non-NULL, %d-byte aligned device pointer", name, p.offsets_bytes);
    DF_REQUIRE(aligned(p.errors, 8), "%s: errors must be NULL or an 8-byte aligned device pointer, got %p", name,
               static_cast<const void*>(p.errors));
  }
  return DUALFLOW_OK;
}

int run(const char* config, Kind kind, const Problem& p, uintptr_t workspace, size_t workspace_bytes,
        uintptr_t stream) {
  const int index = find_config(config, kind);
  if (index < 0) return DUALFLOW_ERR_INVALID_ARGUMENT;
  if (int rc = validate(kConfigs[index], p, /*with_pointers=*/true)) return rc;
  return kEntries[index].run(p, reinterpret_cast<void*>(workspace), workspace_bytes,
                             reinterpret_cast<cudaStream_t>(stream));
}

}  // namespace
}  // namespace dualflow::cutlass_gemm

using dualflow::cutlass_gemm::Kind;
using dualflow::cutlass_gemm::Problem;
namespace cg = dualflow::cutlass_gemm;

extern "C" {

int dualflow_cutlass_config_count(int* count) {
  DF_REQUIRE(count != nullptr, "dualflow_cutlass_config_count: count must not be NULL");
  *count = cg::kNumConfigs;
  return DUALFLOW_OK;
}

int dualflow_cutlass_config_info(int index, char* name, size_t name_len, int* kind, int* tile_m, int* tile_n,
                                 int* tile_k, int* cluster_m, int* cluster_n, int* schedule) {
  DF_REQUIRE(index >= 0 && index < cg::kNumConfigs, "dualflow_cutlass_config_info: index must be in [0, %d), got %d",
             cg::kNumConfigs, index);
  const cg::TileConfig& c = cg::kConfigs[index];
  if (name != nullptr && name_len > 0) snprintf(name, name_len, "%s", c.name);
  const auto put = [](int* out, int value) {
    if (out != nullptr) *out = value;
  };
  put(kind, static_cast<int>(c.kind));
  put(tile_m, c.tile_m);
  put(tile_n, c.tile_n);
  put(tile_k, cg::kTileK);
  put(cluster_m, c.cluster_m);
  put(cluster_n, c.cluster_n);
  put(schedule, static_cast<int>(c.schedule));
  return DUALFLOW_OK;
}

int dualflow_cutlass_workspace_size(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups, int64_t lda,
                                    int64_t ldb, int64_t ldd, int64_t sfa_ld, int64_t sfb_ld, int sm_count,
                                    size_t* bytes) {
  DF_REQUIRE(bytes != nullptr, "dualflow_cutlass_workspace_size: bytes must not be NULL");
  int index = -1;
  for (int i = 0; i < cg::kNumConfigs && config != nullptr; ++i) {
    if (std::strcmp(cg::kConfigs[i].name, config) == 0) index = i;
  }
  DF_REQUIRE(index >= 0, "unknown CUTLASS configuration '%s'; configurations: %s, %s, %s, %s",
             config ? config : "(null)", cg::names_of(Kind::Fwd).c_str(), cg::names_of(Kind::Wgrad).c_str(),
             cg::names_of(Kind::Grouped).c_str(), cg::names_of(Kind::KGroupedWgrad).c_str());
  Problem p;
  p.m = m, p.n = n, p.k = k, p.groups = groups, p.lda = lda, p.ldb = ldb, p.ldd = ldd;
  p.sfa_ld = sfa_ld, p.sfb_ld = sfb_ld, p.sm_count = sm_count;
  if (int rc = cg::validate(cg::kConfigs[index], p, /*with_pointers=*/false)) return rc;
  return cg::kEntries[index].workspace(p, bytes);
}

int dualflow_cutlass_gemm_fwd(const char* config, int64_t m, int64_t n, int64_t k, uintptr_t a, int64_t lda,
                              uintptr_t sfa, int64_t sfa_ld, uintptr_t b, int64_t ldb, uintptr_t sfb, uintptr_t d,
                              int64_t ldd, int sm_count, uintptr_t workspace, size_t workspace_bytes,
                              uintptr_t stream) {
  Problem p;
  p.m = m, p.n = n, p.k = k, p.lda = lda, p.ldb = ldb, p.ldd = ldd, p.sfa_ld = sfa_ld, p.sm_count = sm_count;
  p.a = reinterpret_cast<const void*>(a), p.b = reinterpret_cast<const void*>(b), p.d = reinterpret_cast<void*>(d);
  p.sfa = reinterpret_cast<const float*>(sfa), p.sfb = reinterpret_cast<const float*>(sfb);
  return cg::run(config, Kind::Fwd, p, workspace, workspace_bytes, stream);
}

int dualflow_cutlass_gemm_wgrad(const char* config, int64_t m, int64_t n, int64_t k, uintptr_t a, int64_t lda,
                                uintptr_t sfa, int64_t sfa_ld, uintptr_t b, int64_t ldb, uintptr_t sfb, int64_t sfb_ld,
                                uintptr_t d, int64_t ldd, int accumulate, int sm_count, uintptr_t workspace,
                                size_t workspace_bytes, uintptr_t stream) {
  Problem p;
  p.m = m, p.n = n, p.k = k, p.lda = lda, p.ldb = ldb, p.ldd = ldd, p.sfa_ld = sfa_ld, p.sfb_ld = sfb_ld;
  p.sm_count = sm_count, p.accumulate = accumulate != 0;
  p.a = reinterpret_cast<const void*>(a), p.b = reinterpret_cast<const void*>(b), p.d = reinterpret_cast<void*>(d);
  p.sfa = reinterpret_cast<const float*>(sfa), p.sfb = reinterpret_cast<const float*>(sfb);
  return cg::run(config, Kind::Wgrad, p, workspace, workspace_bytes, stream);
}

int dualflow_cutlass_grouped_gemm(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups, uintptr_t a,
                                  uintptr_t sfa, uintptr_t b, uintptr_t sfb, uintptr_t offsets, int offsets_bytes,
                                  uintptr_t errors, uintptr_t d, int sm_count, uintptr_t workspace,
                                  size_t workspace_bytes, uintptr_t stream) {
  Problem p;
  p.m = m, p.n = n, p.k = k, p.groups = groups, p.lda = k, p.ldb = k, p.ldd = n, p.sm_count = sm_count;
  p.a = reinterpret_cast<const void*>(a), p.b = reinterpret_cast<const void*>(b), p.d = reinterpret_cast<void*>(d);
  p.sfa = reinterpret_cast<const float*>(sfa), p.sfb = reinterpret_cast<const float*>(sfb);
  p.offsets = reinterpret_cast<const void*>(offsets), p.offsets_bytes = offsets_bytes;
  p.errors = reinterpret_cast<int64_t*>(errors);
  return cg::run(config, Kind::Grouped, p, workspace, workspace_bytes, stream);
}

int dualflow_cutlass_kgrouped_wgrad(const char* config, int64_t m, int64_t n, int64_t k, int64_t groups, uintptr_t a,
                                    int64_t lda, uintptr_t sfa, uintptr_t b, int64_t ldb, uintptr_t sfb,
                                    uintptr_t offsets, int offsets_bytes, uintptr_t errors, uintptr_t d, int sm_count,
                                    uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  Problem p;
  p.m = m, p.n = n, p.k = k, p.groups = groups, p.lda = lda, p.ldb = ldb, p.ldd = n, p.sfa_ld = m, p.sfb_ld = n;
  p.sm_count = sm_count;
  p.a = reinterpret_cast<const void*>(a), p.b = reinterpret_cast<const void*>(b), p.d = reinterpret_cast<void*>(d);
  p.sfa = reinterpret_cast<const float*>(sfa), p.sfb = reinterpret_cast<const float*>(sfb);
  p.offsets = reinterpret_cast<const void*>(offsets), p.offsets_bytes = offsets_bytes;
  p.errors = reinterpret_cast<int64_t*>(errors);
  return cg::run(config, Kind::KGroupedWgrad, p, workspace, workspace_bytes, stream);
}

}  // extern "C"
