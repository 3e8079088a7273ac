// notify: every rank counts what it will send to each peer (rows per channel, (token, slot) pairs per
// expert), writes the counts into the peer's buffer, raises its flag there, waits for every peer's flag
// in its own buffer and turns what arrived into the receive prefix matrix and the totals the host
// needs to size the outputs.
#include "common.cuh"
#include "comm/device.cuh"

namespace dualflow::comm {
namespace {

struct NotifyParams {
  dualflow_comm_sizing s;
  Peers peers;
  int32_t rank;
  int32_t topk;
  int64_t num_tokens;
  int64_t num_experts;
  const uint8_t* is_token_in_rank;
  const int64_t* topk_idx;
  uint64_t epoch;
  int32_t* recv_prefix;
  int32_t* totals;
  ErrorSink err;
};

__global__ void __launch_bounds__(kThreads, 1) notify_kernel(const NotifyParams p) {
  __shared__ int32_t channel_counts[kMaxRanks * kMaxChannels];
  __shared__ int32_t expert_counts[kMaxRanks * kMaxLocalExperts];
  __shared__ int32_t failed;
  const int R = p.s.num_ranks, C = p.s.num_channels, tid = static_cast<int>(threadIdx.x);
  const int64_t local_experts = p.num_experts / R;
  for (int i = tid; i < R * C; i += kThreads) channel_counts[i] = 0;
  for (int64_t i = tid; i < p.num_experts; i += kThreads) expert_counts[i] = 0;
  if (tid == 0) failed = 0;
  __syncthreads();
  for (int64_t t = tid; t < p.num_tokens; t += kThreads) {
    const int c = channel_of(p.num_tokens, C, t);
    for (int d = 0; d < R; ++d)
      if (p.is_token_in_rank[t * R + d]) atomicAdd(&channel_counts[d * C + c], 1);
  }
  for (int64_t i = tid; i < p.num_tokens * p.topk; i += kThreads) {
    const int64_t e = p.topk_idx[i];
    if (e >= 0) atomicAdd(&expert_counts[e], 1);
  }
  __syncthreads();
  // My counts for destination d go to d's buffer, slot [parity][my rank]; parity alternates with the
  // epoch so that a fast peer writing the next operation's counts never overwrites unread ones.
  const int parity = static_cast<int>(p.epoch & 1);
  const int64_t width = C + local_experts;
  for (int64_t i = tid; i < R * width; i += kThreads) {
    const int d = static_cast<int>(i / width), j = static_cast<int>(i % width);
    counts_ptr(p.peers.ptr[d], p.s, parity, p.rank)[j] =
        j < C ? channel_counts[d * C + j] : expert_counts[d * local_experts + (j - C)];
  }
  __syncthreads();  // all counts written before any flag is raised (the release below is cumulative)
  if (tid < R) st_release_sys(flag_ptr(p.peers.ptr[tid], p.s, p.rank), p.epoch);
  uint8_t* me = p.peers.ptr[p.rank];
  if (tid < R) {
    uint64_t seen = 0;
    if (!wait_at_least(flag_ptr(me, p.s, tid), p.epoch, p.err, -1, kPhaseNotify, tid, &seen)) failed = 1;
  }
  __syncthreads();
  if (failed) return;
  if (tid == 0) {
    int32_t total = 0;
    for (int src = 0; src < R; ++src) {
      const volatile int32_t* counts = counts_ptr(me, p.s, parity, src);
      int32_t from_src = 0;
      for (int c = 0; c < C; ++c) {
        p.recv_prefix[src * C + c] = total;
        total += counts[c];
        from_src += counts[c];
      }
      p.totals[1 + src] = from_src;
    }
    p.recv_prefix[R * C] = total;
    p.totals[0] = total;
  }
  for (int64_t e = tid; e < local_experts; e += kThreads) {
    int32_t sum = 0;
    for (int src = 0; src < R; ++src) sum += static_cast<const volatile int32_t*>(counts_ptr(me, p.s, parity, src))[C + e];
    p.totals[1 + R + e] = sum;
  }
  __threadfence_system();  // totals reach host memory before the kernel is seen complete
}

}  // namespace

}  // namespace dualflow::comm

extern "C" int dualflow_comm_notify(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                    uintptr_t is_token_in_rank, uintptr_t topk_idx, int64_t num_tokens, int topk,
                                    int64_t num_experts, uint64_t epoch, uintptr_t recv_prefix, uintptr_t totals,
                                    uint64_t timeout_ns, uintptr_t error, uintptr_t stream) {
  using namespace dualflow::comm;
  NotifyParams p{};
  const int rc = check_common(sizing, peers, rank, num_tokens, error, "dualflow_comm_notify", &p.peers);
  if (rc != DUALFLOW_OK) return rc;
  const int R = sizing->num_ranks;
  DF_REQUIRE(topk >= 1 && topk <= kMaxTopk, "dualflow_comm_notify: top-k must be in [1, %d], got %d", kMaxTopk, topk);
  DF_REQUIRE(num_experts >= R && num_experts % R == 0 && num_experts / R <= kMaxLocalExperts,
             "dualflow_comm_notify: num_experts=%lld must be a multiple of %d ranks with at most %d per rank",
             static_cast<long long>(num_experts), R, kMaxLocalExperts);
  DF_REQUIRE(num_tokens == 0 || (is_token_in_rank != 0 && topk_idx != 0),
             "dualflow_comm_notify: is_token_in_rank and topk_idx must not be NULL");
  DF_REQUIRE(recv_prefix != 0 && totals != 0, "dualflow_comm_notify: recv_prefix and totals must not be NULL");
  DF_REQUIRE(epoch >= 1, "dualflow_comm_notify: epoch starts at 1 (flags start at 0)");
  p.s = *sizing;
  p.rank = rank;
  p.topk = topk;
  p.num_tokens = num_tokens;
  p.num_experts = num_experts;
  p.is_token_in_rank = reinterpret_cast<const uint8_t*>(is_token_in_rank);
  p.topk_idx = reinterpret_cast<const int64_t*>(topk_idx);
  p.epoch = epoch;
  p.recv_prefix = reinterpret_cast<int32_t*>(recv_prefix);
  p.totals = reinterpret_cast<int32_t*>(totals);
  p.err = error_sink(*sizing, p.peers, rank, error, timeout_ns);
  notify_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}
