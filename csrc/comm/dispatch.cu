// dispatch: exactly num_sms blocks, paired into channels. The even block of channel c sends the channel's
// tokens (a contiguous slice) to every rank, one warp group per destination, into rings that live in
// the destinations' buffers; the odd block receives the channel's rows from every source, one warp
// group per source, and copies them to rows [prefix[s*C + c], prefix[s*C + c + 1]) of the outputs. Since
// channels are contiguous token slices in order and each ring is FIFO, the outputs end up in (source
// rank, source token) order.
#include "common.cuh"
#include "comm/device.cuh"

namespace dualflow::comm {
namespace {

struct DispatchParams {
  dualflow_comm_sizing s;
  Peers peers;
  int32_t rank;
  int32_t num_fields;
  int32_t topk;  // 0: top-k ids not sent (cached routing)
  int64_t num_tokens;
  int64_t num_local_experts;
  const uint8_t* is_token_in_rank;
  const int32_t* recv_prefix;
  const uint8_t* src[kMaxFields];
  uint8_t* dst[kMaxFields];
  int64_t bytes[kMaxFields];
  const int64_t* topk_idx;
  int64_t* recv_topk_idx;
  int32_t* recv_src_idx;
  int32_t* send_pos;
  MessageLayout msg;
  ErrorSink err;
};

__device__ void send_channel(const DispatchParams& p, const Groups& g, int channel, volatile uint64_t* flag) {
  const int R = p.s.num_ranks, d = g.group;
  uint8_t* me = p.peers.ptr[p.rank];
  const SendEnds ends{ring_ptr(p.peers.ptr[d], p.s, p.rank, channel), tail_ptr(p.peers.ptr[d], p.s, p.rank, channel),
                      head_ptr(me, p.s, d, channel), sent_ptr(me, p.s, d, channel)};
  int64_t begin, end;
  channel_range(p.num_tokens, p.s.num_channels, channel, &begin, &end);
  const int64_t first_local = d * p.num_local_experts;
  push_rows(
      g, p.s, ends, begin, end, [&](int64_t t) { return p.is_token_in_rank[t * R + d] != 0; },
      [&](int64_t t, uint8_t* slot, uint64_t position) {
        for (int f = 0; f < p.num_fields; ++f)
          warp_copy(slot + p.msg.field_offset[f], p.src[f] + t * p.bytes[f], p.bytes[f], g.lane, false);
        if (g.lane < p.topk) {  // rewritten to the destination's local expert ids, -1 elsewhere
          const int64_t e = p.topk_idx[t * p.topk + g.lane] - first_local;
          reinterpret_cast<int64_t*>(slot + p.msg.topk_offset)[g.lane] =
              (p.topk_idx[t * p.topk + g.lane] >= 0 && e >= 0 && e < p.num_local_experts) ? e : -1;
        }
        if (g.lane == 0) {
          *reinterpret_cast<int32_t*>(slot + p.msg.src_offset) = static_cast<int32_t>(t);
          p.send_pos[t * R + d] = static_cast<int32_t>(position);
        }
      },
      p.err, channel, kPhaseDispatchSend, d, flag);
}

__device__ void receive_channel(const DispatchParams& p, const Groups& g, int channel, volatile uint64_t* value) {
  const int C = p.s.num_channels, src = g.group;
  uint8_t* me = p.peers.ptr[p.rank];
  const RecvEnds ends{ring_ptr(me, p.s, src, channel), tail_ptr(me, p.s, src, channel),
                      head_ptr(p.peers.ptr[src], p.s, p.rank, channel), consumed_ptr(me, p.s, src, channel)};
  const int64_t first = p.recv_prefix[src * C + channel];
  const int64_t count = p.recv_prefix[src * C + channel + 1] - first;
  pop_rows(
      g, p.s, ends, count,
      [&](int64_t i, const uint8_t* slot) {
        const int64_t row = first + i;
        for (int f = 0; f < p.num_fields; ++f)
          warp_copy(p.dst[f] + row * p.bytes[f], slot + p.msg.field_offset[f], p.bytes[f], g.lane, true);
        if (g.lane < p.topk)
          p.recv_topk_idx[row * p.topk + g.lane] =
              *reinterpret_cast<const volatile int64_t*>(slot + p.msg.topk_offset + 8 * g.lane);
        if (g.lane == 0) p.recv_src_idx[row] = ld_volatile_s32(reinterpret_cast<const int*>(slot + p.msg.src_offset));
      },
      p.err, channel, kPhaseDispatchRecv, src, value);
}

__global__ void __launch_bounds__(kThreads, 1) dispatch_kernel(const DispatchParams p) {
  __shared__ uint64_t group_word[kMaxRanks];
  const Groups g(p.s.num_ranks);
  if (g.group >= p.s.num_ranks) return;  // warps left over when kWarps is not a multiple of R
  const int channel = static_cast<int>(blockIdx.x / 2);
  if (blockIdx.x % 2 == 0)
    send_channel(p, g, channel, &group_word[g.group]);
  else
    receive_channel(p, g, channel, &group_word[g.group]);
}

}  // namespace
}  // namespace dualflow::comm

extern "C" int dualflow_comm_dispatch(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                      int64_t num_tokens, uintptr_t is_token_in_rank, uintptr_t recv_prefix,
                                      int num_fields, const uintptr_t* src, const uintptr_t* dst, const int64_t* bytes,
                                      uintptr_t topk_idx, int topk, int64_t num_local_experts, uintptr_t recv_topk_idx,
                                      uintptr_t recv_src_idx, uintptr_t send_pos, uint64_t timeout_ns, uintptr_t error,
                                      uintptr_t stream) {
  using namespace dualflow::comm;
  DispatchParams p{};
  const int rc = check_common(sizing, peers, rank, num_tokens, error, "dualflow_comm_dispatch", &p.peers);
  if (rc != DUALFLOW_OK) return rc;
  DF_REQUIRE(num_fields >= 0 && num_fields <= kMaxFields && (num_fields == 0 || (src && dst && bytes)),
             "dualflow_comm_dispatch: num_fields must be in [0, %d] with src, dst and bytes arrays", kMaxFields);
  // Pointers of empty tensors may be NULL (a rank with no tokens, or receiving none): only alignment is
  // checked for arrays whose length the host does not know.
  for (int f = 0; f < num_fields; ++f) {
    DF_REQUIRE(bytes[f] >= 0 && bytes[f] % 4 == 0, "dualflow_comm_dispatch: field %d has %lld bytes per row, "
               "expected a multiple of 4", f, static_cast<long long>(bytes[f]));
    DF_REQUIRE(src[f] % 16 == 0 && dst[f] % 16 == 0 && (src[f] != 0 || num_tokens == 0 || bytes[f] == 0),
               "dualflow_comm_dispatch: field %d: src and dst must be 16-byte aligned (src non-NULL)", f);
    p.src[f] = reinterpret_cast<const uint8_t*>(src[f]);
    p.dst[f] = reinterpret_cast<uint8_t*>(dst[f]);
    p.bytes[f] = bytes[f];
  }
  // topk > 0: the top-k ids travel with the rows (new routing); 0: they do not (cached routing). Every
  // rank passes the same value, so senders and receivers agree on the message layout.
  DF_REQUIRE(topk >= 0 && topk <= kMaxTopk && (topk == 0 || num_local_experts >= 1),
             "dualflow_comm_dispatch: topk must be in [0, %d] (0: ids not sent), with num_local_experts >= 1",
             kMaxTopk);
  DF_REQUIRE(num_tokens == 0 || (is_token_in_rank != 0 && send_pos != 0 && (topk == 0 || topk_idx != 0)),
             "dualflow_comm_dispatch: is_token_in_rank, send_pos (and topk_idx when topk > 0) must not be NULL");
  DF_REQUIRE(recv_prefix != 0, "dualflow_comm_dispatch: recv_prefix must not be NULL");
  p.topk = topk;
  p.msg = dispatch_message(num_fields, bytes, p.topk);
  DF_REQUIRE(p.msg.bytes <= sizing->slot_bytes,
             "dualflow_comm_dispatch: a message of %lld bytes does not fit the %lld-byte ring slots of this buffer "
             "(sized for rows of %lld bytes and top-%d); create the Buffer for this payload",
             static_cast<long long>(p.msg.bytes), static_cast<long long>(sizing->slot_bytes),
             static_cast<long long>(sizing->row_bytes), sizing->topk);
  p.s = *sizing;
  p.rank = rank;
  p.num_fields = num_fields;
  p.num_tokens = num_tokens;
  p.num_local_experts = num_local_experts;
  p.is_token_in_rank = reinterpret_cast<const uint8_t*>(is_token_in_rank);
  p.recv_prefix = reinterpret_cast<const int32_t*>(recv_prefix);
  p.topk_idx = reinterpret_cast<const int64_t*>(topk_idx);
  p.recv_topk_idx = reinterpret_cast<int64_t*>(recv_topk_idx);
  p.recv_src_idx = reinterpret_cast<int32_t*>(recv_src_idx);
  p.send_pos = reinterpret_cast<int32_t*>(send_pos);
  p.err = error_sink(*sizing, p.peers, rank, error, timeout_ns);
  dispatch_kernel<<<2 * sizing->num_channels, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}
