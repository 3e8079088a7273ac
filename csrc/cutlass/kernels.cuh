// CUTLASS 3.x Hopper kernels for the configurations of configs.h: warp-specialized TMA + WGMMA mainloops
// with FP8 E4M3 operands, FP32 accumulation and blockwise scales applied every 128 of K (the FP8
// blockwise collectives of CUTLASS >= 3.9), TMA epilogues. Included by exactly one translation unit per
// configuration, which expands DF_CUTLASS_INSTANTIATE(index, name).
#pragma once

#include <cutlass/cutlass.h>
#include <cutlass/detail/blockwise_scale_layout.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/gemm/group_array_problem_shape.hpp>
#include <cutlass/gemm/kernel/gemm_universal.hpp>

#include <cute/tensor.hpp>

#include <type_traits>

#include "common.cuh"
#include "configs.h"

namespace dualflow::cutlass_gemm {

template <int I>
struct Kernel {
  static constexpr TileConfig kCfg = kConfigs[I];
  // k-grouped: a weight gradient (FP32 out, 1x128 scales along K on both operands) over groups of columns
  static constexpr bool kKGrouped = kCfg.kind == Kind::KGroupedWgrad;
  static constexpr bool kGrouped = kCfg.kind == Kind::Grouped || kKGrouped;
  static constexpr bool kWgrad = kCfg.kind == Kind::Wgrad || kKGrouped;
  static constexpr bool kCooperative = kCfg.schedule == Schedule::Cooperative;

  using ElementAB = cutlass::float_e4m3_t;
  // The weight gradient accumulates in FP32 and reads its output back (C = D) when asked to add into it
  // (the dense one; the k-grouped one always overwrites).
  using ElementD = std::conditional_t<kWgrad, float, cutlass::bfloat16_t>;
  using ElementC = std::conditional_t<kWgrad && !kGrouped, float, void>;
  static constexpr int kAlignAB = 16;  // elements = bytes (TMA needs 16-byte aligned rows)
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));

  using TileShape = cute::Shape<cute::Int<kCfg.tile_m>, cute::Int<kCfg.tile_n>, cute::Int<kTileK>>;
  using ClusterShape = cute::Shape<cute::Int<kCfg.cluster_m>, cute::Int<kCfg.cluster_n>, cute::_1>;

  // A: one scale per row and 128 of K, MN-major so that a tile's scales are contiguous (TMA-loadable).
  // B: one scale per 128x128 block in the weights' own K-major layout, or for the weight gradient one
  // per row and 128 of K, MN-major like A.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<
      1, kWgrad ? 1 : kScaleBlock, kScaleBlock, cute::GMMA::Major::MN,
      kWgrad ? cute::GMMA::Major::MN : cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  // Grouped kernels take one stride / scale layout per group: pointer tags.
  template <class T>
  using PerGroup = std::conditional_t<kGrouped, T*, T>;
  using LayoutA = cutlass::layout::RowMajor;     // A [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // B^T [K, N] column-major == B [N, K] row-major
  using LayoutD = cutlass::layout::RowMajor;     // D [M, N]

  using MainloopSchedule = std::conditional_t<
      kGrouped,
      std::conditional_t<kCooperative, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                         cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise>,
      std::conditional_t<kCooperative, cutlass::gemm::KernelTmaWarpSpecializedCooperativeFP8Blockwise,
                         cutlass::gemm::KernelTmaWarpSpecializedPingpongFP8Blockwise>>;
  using EpilogueSchedule = std::conditional_t<
      kGrouped,
      std::conditional_t<kCooperative, cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
                         cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong>,
      std::conditional_t<kCooperative, cutlass::epilogue::TmaWarpSpecializedCooperative,
                         cutlass::epilogue::TmaWarpSpecialized>>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, ElementC, PerGroup<LayoutD>, kAlignD,
      ElementD, PerGroup<LayoutD>, kAlignD, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<ElementD, float, ElementC, float>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementAB,
      cute::tuple<PerGroup<LayoutA>, PerGroup<LayoutSFA>>, kAlignAB, ElementAB,
      cute::tuple<PerGroup<LayoutB>, PerGroup<LayoutSFB>>, kAlignAB, float, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;

  using ProblemShape = std::conditional_t<kGrouped, cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>,
                                          cute::Shape<int, int, int, int>>;
  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;
  using Arguments = typename Gemm::Arguments;
};

inline size_t align_bytes(size_t x) { return (x + 127) / 128 * 128; }

// Per-group argument arrays of a grouped GEMM, carved from the caller's workspace after CUTLASS's own
// (empty for the dense configurations).
template <int I, bool Grouped = Kernel<I>::kGrouped>
struct GroupArrays {};

template <int I>
struct GroupArrays<I, true> {
  using K = Kernel<I>;
  using GK = typename K::GemmKernel;
  typename K::ProblemShape::UnderlyingProblemShape* shapes;
  const typename K::ElementAB** a;
  const typename K::ElementAB** b;
  const float** sfa;
  const float** sfb;
  typename K::ElementD** d;
  typename GK::InternalStrideA* stride_a;
  typename GK::InternalStrideB* stride_b;
  typename GK::InternalStrideD* stride_d;
  // k-grouped: one 128-column block of zero operands and zero scales ([m + n, 128] FP8, then m + n FP32),
  // which a group without columns multiplies instead (CUTLASS is not asked for a K = 0 problem): its D[g]
  // comes out zero
  char* zeros;
  size_t zeros_bytes;

  static size_t zeros_size(const Problem& p) {
    return K::kKGrouped ? align_bytes(static_cast<size_t>(p.m + p.n) * (kScaleBlock + sizeof(float))) : 0;
  }

  // Lays the arrays out from `base` (nullptr: only measure); returns the bytes used.
  static size_t carve(char* base, const Problem& p, GroupArrays* out) {
    const int64_t groups = p.groups;
    size_t offset = 0;
    auto take = [&](auto*& ptr) {
      using T = std::remove_pointer_t<std::remove_reference_t<decltype(ptr)>>;
      ptr = base == nullptr ? nullptr : reinterpret_cast<T*>(base + offset);
      offset = align_bytes(offset + sizeof(T) * static_cast<size_t>(groups));
    };
    GroupArrays arrays{};
    take(arrays.shapes);
    take(arrays.a);
    take(arrays.b);
    take(arrays.sfa);
    take(arrays.sfb);
    take(arrays.d);
    take(arrays.stride_a);
    take(arrays.stride_b);
    take(arrays.stride_d);
    arrays.zeros = base == nullptr ? nullptr : base + offset;
    arrays.zeros_bytes = zeros_size(p);
    offset += arrays.zeros_bytes;
    if (out != nullptr) *out = arrays;
    return offset;
  }
};

// Thread 0 of the argument kernel: writes the first malformed group (an offset outside [0, bound] or below
// its predecessor) into p.errors, unless an earlier error is recorded there already.
template <class Offset>
__device__ void record_malformed(const Offset* __restrict__ offsets, const Problem& p, int64_t bound) {
  if (p.errors == nullptr || p.errors[0] != 0) return;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t lo = static_cast<int64_t>(offsets[g]), hi = static_cast<int64_t>(offsets[g + 1]);
    if (lo < 0 || hi < 0 || lo > bound || hi > bound || hi < lo) {
      p.errors[1] = g;
      p.errors[2] = lo;
      p.errors[3] = hi;
      p.errors[4] = bound;
      p.errors[0] = 1;  // the code last: a record is complete once its code is set
      return;
    }
  }
}

// One thread per group: problem shape, pointers and strides of group g from the device-side row offsets,
// so that the host never waits for the group sizes. Offsets are clamped into [0, m] and made
// non-decreasing: malformed offsets can leave rows unwritten but never make the kernel touch memory
// outside the operands; thread 0 records them (record_malformed).
template <int I, class Offset>
__global__ void fill_group_arrays(GroupArrays<I> arrays, const Offset* __restrict__ offsets, Problem p) {
  using K = Kernel<I>;
  const int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t bound = K::kKGrouped ? p.k : p.m;
  if (g == 0) record_malformed(offsets, p, bound);
  if (g >= p.groups) return;
  auto clamp = [&](int64_t x) { return x < 0 ? int64_t{0} : (x > bound ? bound : x); };
  const int64_t begin = clamp(static_cast<int64_t>(offsets[g]));
  const int64_t next = clamp(static_cast<int64_t>(offsets[g + 1]));
  const int64_t end = next < begin ? begin : next;
  if constexpr (K::kKGrouped) {
    // columns [begin, end) of a and b; offsets off the 128-column scale blocks (a broken contract of the
    // caller) are rounded down to them, so that no scale is read from outside its block
    const int64_t lo = begin / kScaleBlock * kScaleBlock, hi = end / kScaleBlock * kScaleBlock;
    const auto* a = static_cast<const typename K::ElementAB*>(p.a);
    const auto* b = static_cast<const typename K::ElementAB*>(p.b);
    arrays.d[g] = static_cast<typename K::ElementD*>(p.d) + g * p.m * p.n;
    arrays.stride_d[g] = cute::make_stride(p.n, cute::Int<1>{}, cute::Int<0>{});
    if (hi > lo) {
      arrays.shapes[g] = cute::make_shape(static_cast<int>(p.m), static_cast<int>(p.n), static_cast<int>(hi - lo));
      arrays.a[g] = a + lo;
      arrays.b[g] = b + lo;
      arrays.sfa[g] = p.sfa + lo / kScaleBlock * p.m;
      arrays.sfb[g] = p.sfb + lo / kScaleBlock * p.n;
      arrays.stride_a[g] = cute::make_stride(p.lda, cute::Int<1>{}, cute::Int<0>{});
      arrays.stride_b[g] = cute::make_stride(p.ldb, cute::Int<1>{}, cute::Int<0>{});
    } else {  // no columns: one block of zeros (GroupArrays::zeros), so that D[g] = 0
      const auto* zero_ab = reinterpret_cast<const typename K::ElementAB*>(arrays.zeros);
      const auto* zero_scales = reinterpret_cast<const float*>(arrays.zeros + (p.m + p.n) * kScaleBlock);
      arrays.shapes[g] = cute::make_shape(static_cast<int>(p.m), static_cast<int>(p.n), int{kScaleBlock});
      arrays.a[g] = zero_ab;
      arrays.b[g] = zero_ab + p.m * kScaleBlock;
      arrays.sfa[g] = zero_scales;
      arrays.sfb[g] = zero_scales + p.m;
      arrays.stride_a[g] = cute::make_stride(int64_t{kScaleBlock}, cute::Int<1>{}, cute::Int<0>{});
      arrays.stride_b[g] = cute::make_stride(int64_t{kScaleBlock}, cute::Int<1>{}, cute::Int<0>{});
    }
    return;
  }
  const int64_t kb = p.k / kScaleBlock, nb = (p.n + kScaleBlock - 1) / kScaleBlock;
  arrays.shapes[g] = cute::make_shape(static_cast<int>(end - begin), static_cast<int>(p.n), static_cast<int>(p.k));
  arrays.a[g] = static_cast<const typename K::ElementAB*>(p.a) + begin * p.k;
  arrays.b[g] = static_cast<const typename K::ElementAB*>(p.b) + g * p.n * p.k;
  arrays.sfa[g] = p.sfa + begin * kb;
  arrays.sfb[g] = p.sfb + g * nb * kb;
  arrays.d[g] = static_cast<typename K::ElementD*>(p.d) + begin * p.n;
  arrays.stride_a[g] = cute::make_stride(p.k, cute::Int<1>{}, cute::Int<0>{});
  arrays.stride_b[g] = cute::make_stride(p.k, cute::Int<1>{}, cute::Int<0>{});
  arrays.stride_d[g] = cute::make_stride(p.n, cute::Int<1>{}, cute::Int<0>{});
}

template <int I>
typename Kernel<I>::Arguments make_arguments(const Problem& p, [[maybe_unused]] const GroupArrays<I>* arrays) {
  using K = Kernel<I>;
  using GK = typename K::GemmKernel;
  using cute::Int;
  cutlass::KernelHardwareInfo hw;
  hw.sm_count = p.sm_count;
  typename K::Arguments args{};
  if constexpr (K::kGrouped) {
    // The 4.2 grouped blockwise mainloop derives each group's scale layouts from its problem shape
    // (MN-major [k/128, m_g] blocks for A, K-major for B; k-grouped: MN-major [k_g/128, m] and
    // [k_g/128, n]), so no per-group scale layouts are passed.
    args = typename K::Arguments{
        cutlass::gemm::GemmUniversalMode::kGrouped,
        {static_cast<int>(p.groups), arrays->shapes, nullptr},
        {arrays->a, arrays->stride_a, arrays->b, arrays->stride_b, arrays->sfa, nullptr, arrays->sfb, nullptr},
        {{}, nullptr, nullptr, arrays->d, arrays->stride_d},
        hw};
  } else {
    const int m = static_cast<int>(p.m), n = static_cast<int>(p.n), k = static_cast<int>(p.k);
    // MN-major scale matrices are described with their padded extent (= leading dimension), which is
    // what CUTLASS's alignment checks and the scale TMA see; rows past m are never used.
    const int sfa_rows = static_cast<int>(p.sfa_ld);
    const int sfb_rows = K::kWgrad ? static_cast<int>(p.sfb_ld) : n;
    auto* d = static_cast<typename K::ElementD*>(p.d);
    const typename GK::StrideD stride_d = cute::make_stride(p.ldd, Int<1>{}, int64_t{0});
    typename GK::StrideC stride_c{};
    typename K::ElementD const* c = nullptr;
    if constexpr (K::kWgrad) {
      c = d;  // in place: each output tile is read before the same CTA overwrites it
      stride_c = stride_d;
    }
    args = typename K::Arguments{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {static_cast<const typename K::ElementAB*>(p.a), cute::make_stride(p.lda, Int<1>{}, int64_t{0}),
         static_cast<const typename K::ElementAB*>(p.b), cute::make_stride(p.ldb, Int<1>{}, int64_t{0}), p.sfa,
         K::ScaleConfig::tile_atom_to_shape_SFA(cute::make_shape(sfa_rows, n, k, 1)), p.sfb,
         K::ScaleConfig::tile_atom_to_shape_SFB(cute::make_shape(m, sfb_rows, k, 1))},
        {{}, c, stride_c, d, stride_d},
        hw};
  }
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = p.accumulate ? 1.0f : 0.0f;  // beta == 0: C is never read
  return args;
}

template <int I>
int check_implementable(const typename Kernel<I>::Arguments& args, const Problem& p) {
  const cutlass::Status status = Kernel<I>::Gemm::can_implement(args);
  if (status == cutlass::Status::kSuccess) return DUALFLOW_OK;
  return set_error(DUALFLOW_ERR_UNSUPPORTED,
                   "CUTLASS cannot run configuration '%s' on m=%lld n=%lld k=%lld groups=%lld: %s "
                   "(rows of A/B/D must be 16-byte aligned, scale leading dimensions multiples of 4)",
                   kConfigs[I].name, static_cast<long long>(p.m), static_cast<long long>(p.n),
                   static_cast<long long>(p.k), static_cast<long long>(p.groups), cutlass::cutlassGetStatusString(status));
}

// CUTLASS's workspace (first, so it keeps the caller's alignment) and the total the caller must provide.
template <int I>
int workspace_impl(const Problem& p, size_t* cutlass_bytes, size_t* total_bytes) {
  GroupArrays<I> unplaced{};
  const auto args = make_arguments<I>(p, &unplaced);
  if (int rc = check_implementable<I>(args, p)) return rc;
  *cutlass_bytes = align_bytes(Kernel<I>::Gemm::get_workspace_size(args));
  *total_bytes = *cutlass_bytes;
  if constexpr (Kernel<I>::kGrouped) *total_bytes += GroupArrays<I>::carve(nullptr, p, nullptr);
  return DUALFLOW_OK;
}

template <int I>
int config_workspace(const Problem& p, size_t* bytes) {
  size_t cutlass_bytes = 0;
  return workspace_impl<I>(p, &cutlass_bytes, bytes);
}

template <int I>
int config_run(const Problem& p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using K = Kernel<I>;
  const char* name = kConfigs[I].name;
  size_t cutlass_bytes = 0, needed = 0;
  if (int rc = workspace_impl<I>(p, &cutlass_bytes, &needed)) return rc;
  DF_REQUIRE(workspace_bytes >= needed && (needed == 0 || workspace != nullptr),
             "%s: the workspace has %zu bytes, this problem needs %zu (ask dualflow_cutlass_workspace_size)", name,
             workspace_bytes, needed);
  GroupArrays<I> arrays{};
  if constexpr (K::kGrouped) {
    GroupArrays<I>::carve(static_cast<char*>(workspace) + cutlass_bytes, p, &arrays);
    if (arrays.zeros_bytes > 0) DF_CUDA(cudaMemsetAsync(arrays.zeros, 0, arrays.zeros_bytes, stream));
    const int threads = 128;
    const int blocks = static_cast<int>((p.groups + threads - 1) / threads);
    if (p.offsets_bytes == 8) {
      fill_group_arrays<I><<<blocks, threads, 0, stream>>>(arrays, static_cast<const int64_t*>(p.offsets), p);
    } else {
      fill_group_arrays<I><<<blocks, threads, 0, stream>>>(arrays, static_cast<const int32_t*>(p.offsets), p);
    }
    DF_CUDA(cudaGetLastError());
  }
  typename K::Gemm gemm;
  cutlass::Status status = gemm.initialize(make_arguments<I>(p, &arrays), workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    return set_error(DUALFLOW_ERR_CUDA, "%s: CUTLASS initialize failed: %s (CUDA: %s)", name,
                     cutlass::cutlassGetStatusString(status), cudaGetErrorString(cudaGetLastError()));
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    return set_error(DUALFLOW_ERR_CUDA, "%s: CUTLASS launch failed: %s (CUDA: %s)", name,
                     cutlass::cutlassGetStatusString(status), cudaGetErrorString(cudaGetLastError()));
  }
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}

}  // namespace dualflow::cutlass_gemm

// Instantiates the two entry points of configs.h for configuration `index` (explicit instantiations:
// api.cu only sees their declarations), checking that the index is the one named.
#define DF_CUTLASS_INSTANTIATE(index, config_name)                                                        \
  namespace dualflow::cutlass_gemm {                                                                       \
  static_assert(same_name(kConfigs[index].name, config_name), "configs.h index does not match the name"); \
  template int config_workspace<index>(const Problem&, size_t*);                                           \
  template int config_run<index>(const Problem&, void*, size_t, cudaStream_t);                             \
  }
