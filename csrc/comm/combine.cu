// combine: the mirror of dispatch on exactly num_sms blocks. The even block of channel c sends back the
// rows this rank received in channel c, one warp group per source rank, into rings in the sources'
// buffers. The odd block owns the channel's tokens of this rank: each warp takes one token, waits for
// its row in the ring of every rank it was sent to (send_pos says where in that ring's stream), adds
// the rows in FP32 in ascending rank order starting from +0.0, and writes the sum in the rows' dtype.
#include <cuda_bf16.h>

#include "common.cuh"
#include "comm/device.cuh"

namespace dualflow::comm {
namespace {

struct CombineParams {
  dualflow_comm_sizing s;
  Peers peers;
  int32_t rank;
  int32_t elem_bytes;  // 2: bfloat16, 4: float32
  int32_t topk;        // 0: no weights
  int64_t num_tokens;
  int64_t row_bytes;
  const int32_t* send_pos;
  const int32_t* recv_prefix;
  const uint8_t* rows;
  const float* weights;
  uint8_t* out;
  float* out_weights;
  ErrorSink err;
};

__device__ void send_channel(const CombineParams& p, const Groups& g, int channel, volatile uint64_t* flag) {
  const int C = p.s.num_channels, src = g.group;  // the rank these rows came from in the dispatch
  uint8_t* me = p.peers.ptr[p.rank];
  const SendEnds ends{ring_ptr(p.peers.ptr[src], p.s, p.rank, channel),
                      tail_ptr(p.peers.ptr[src], p.s, p.rank, channel), head_ptr(me, p.s, src, channel),
                      sent_ptr(me, p.s, src, channel)};
  const int64_t weights_offset = pad16(p.row_bytes);
  push_rows(
      g, p.s, ends, p.recv_prefix[src * C + channel], p.recv_prefix[src * C + channel + 1],
      [](int64_t) { return true; },
      [&](int64_t row, uint8_t* slot, uint64_t) {
        warp_copy(slot, p.rows + row * p.row_bytes, p.row_bytes, g.lane, false);
        if (g.lane < p.topk)
          reinterpret_cast<float*>(slot + weights_offset)[g.lane] = p.weights[row * p.topk + g.lane];
      },
      p.err, channel, kPhaseCombineSend, src, flag);
}

// Adds 16 bytes of each contributing rank's row (8 BF16 or 4 FP32 values) in FP32, rank ascending.
template <int kElemBytes>
__device__ int4 add_vector(const uint8_t* const* slots, int num_ranks, int64_t offset) {
  constexpr int kVals = 16 / kElemBytes;
  float acc[kVals];
#pragma unroll
  for (int i = 0; i < kVals; ++i) acc[i] = 0.0f;
  for (int d = 0; d < num_ranks; ++d) {
    if (slots[d] == nullptr) continue;
    const int4 v = ld_volatile_v4(reinterpret_cast<const int4*>(slots[d] + offset));
    if constexpr (kElemBytes == 2) {
      const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
      for (int i = 0; i < kVals; ++i) acc[i] += __bfloat162float(x[i]);
    } else {
      const float* x = reinterpret_cast<const float*>(&v);
#pragma unroll
      for (int i = 0; i < kVals; ++i) acc[i] += x[i];
    }
  }
  int4 out;
  if constexpr (kElemBytes == 2) {
    __nv_bfloat16* y = reinterpret_cast<__nv_bfloat16*>(&out);
#pragma unroll
    for (int i = 0; i < kVals; ++i) y[i] = __float2bfloat16_rn(acc[i]);  // round to nearest even, like torch
  } else {
    float* y = reinterpret_cast<float*>(&out);
#pragma unroll
    for (int i = 0; i < kVals; ++i) y[i] = acc[i];
  }
  return out;
}

__device__ void receive_channel(const CombineParams& p, int channel) {
  __shared__ uint64_t base[kMaxRanks];
  __shared__ uint32_t batch_max[2][kMaxRanks];  // rows consumed per ring by a batch, double-buffered
  __shared__ int32_t failed[2];  // by batch parity: a fast warp's next batch never hides this one's verdict
  const int R = p.s.num_ranks, warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  uint8_t* me = p.peers.ptr[p.rank];
  if (threadIdx.x < static_cast<unsigned>(R)) {
    base[threadIdx.x] = *consumed_ptr(me, p.s, threadIdx.x, channel);
    batch_max[0][threadIdx.x] = batch_max[1][threadIdx.x] = 0;
  }
  if (threadIdx.x == 0) failed[0] = failed[1] = 0;
  __syncthreads();
  int64_t begin, end;
  channel_range(p.num_tokens, p.s.num_channels, channel, &begin, &end);
  const int64_t weights_offset = pad16(p.row_bytes);
  uint64_t tail_seen = 0;   // lane d: last tail value read from ring d
  uint32_t released = 0;    // thread d: rows of ring d released so far
  int batch = 0;
  for (int64_t t0 = begin; t0 < end; t0 += kWarps, ++batch) {
    const int64_t t = t0 + warp;
    if (t < end) {
      // Lane d < R: where token t's row sits in ring d's stream of this operation (-1: not sent to d).
      const int pos = lane < R ? p.send_pos[t * R + lane] : -1;
      bool ok = true;
      if (pos >= 0) {
        const uint64_t need = base[lane] + pos + 1;
        if (tail_seen < need)
          ok = wait_at_least(tail_ptr(me, p.s, lane, channel), need, p.err, channel, kPhaseCombineRecv, lane,
                             &tail_seen);
      }
      const bool all_ok = __all_sync(0xffffffffu, ok);
      // Lane d acquired ring d's tail; every lane reads every ring's row below. A vote orders no memory, a
      // warp barrier does: after it the rows published with each lane's acquired tail are visible to all.
      __syncwarp();
      if (all_ok) {
        const uint8_t* slots[kMaxRanks];
        for (int d = 0; d < R; ++d) {
          const int pd = __shfl_sync(0xffffffffu, pos, d);
          slots[d] = pd < 0 ? nullptr
                            : ring_ptr(me, p.s, d, channel) + ((base[d] + pd) % p.s.num_slots) * p.s.slot_bytes;
        }
        uint8_t* out = p.out + t * p.row_bytes;
        for (int64_t off = lane * 16; off < p.row_bytes; off += 32 * 16)
          *reinterpret_cast<int4*>(out + off) =
              p.elem_bytes == 2 ? add_vector<2>(slots, R, off) : add_vector<4>(slots, R, off);
        if (lane < p.topk) {
          float acc = 0.0f;
          for (int d = 0; d < R; ++d)
            if (slots[d] != nullptr)
              acc += *reinterpret_cast<const volatile float*>(slots[d] + weights_offset + 4 * lane);
          p.out_weights[t * p.topk + lane] = acc;
        }
        if (pos >= 0) atomicMax(&batch_max[batch & 1][lane], static_cast<uint32_t>(pos + 1));
      } else if (lane == 0) {
        failed[batch & 1] = 1;
      }
    }
    __syncthreads();  // the batch's rows are read: their slots may be released
    if (threadIdx.x < static_cast<unsigned>(R)) {
      const uint32_t consumed = batch_max[batch & 1][threadIdx.x];
      batch_max[batch & 1][threadIdx.x] = 0;  // reused two batches later, after the next barrier
      if (consumed > released) {
        released = consumed;
        st_release_sys(head_ptr(p.peers.ptr[threadIdx.x], p.s, p.rank, channel), base[threadIdx.x] + released);
      }
    }
    if (failed[batch & 1]) return;  // every thread reads the same verdict: the block leaves together
  }
  if (threadIdx.x < static_cast<unsigned>(R))
    *consumed_ptr(me, p.s, threadIdx.x, channel) = base[threadIdx.x] + released;
}

__global__ void __launch_bounds__(kThreads, 1) combine_kernel(const CombineParams p) {
  __shared__ uint64_t group_word[kMaxRanks];
  const int channel = static_cast<int>(blockIdx.x / 2);
  if (blockIdx.x % 2 == 1) {
    receive_channel(p, channel);
    return;
  }
  const Groups g(p.s.num_ranks);
  if (g.group < p.s.num_ranks) send_channel(p, g, channel, &group_word[g.group]);
}

}  // namespace
}  // namespace dualflow::comm

extern "C" int dualflow_comm_combine(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                     int64_t num_tokens, uintptr_t send_pos, uintptr_t recv_prefix, uintptr_t rows,
                                     int64_t width, int elem_bytes, uintptr_t weights, int topk, uintptr_t out,
                                     uintptr_t out_weights, uint64_t timeout_ns, uintptr_t error, uintptr_t stream) {
  using namespace dualflow::comm;
  CombineParams p{};
  const int rc = check_common(sizing, peers, rank, num_tokens, error, "dualflow_comm_combine", &p.peers);
  if (rc != DUALFLOW_OK) return rc;
  DF_REQUIRE(elem_bytes == 2 || elem_bytes == 4, "dualflow_comm_combine: elem_bytes must be 2 (bfloat16) or 4 "
             "(float32), got %d", elem_bytes);
  DF_REQUIRE(width >= 0 && (width * elem_bytes) % 16 == 0, "dualflow_comm_combine: rows of %lld x %d bytes are not "
             "a multiple of 16 bytes", static_cast<long long>(width), elem_bytes);
  // topk > 0: weights travel with the rows (every rank passes the same value); their arrays may be NULL
  // when empty.
  DF_REQUIRE(topk >= 0 && topk <= kMaxTopk, "dualflow_comm_combine: topk must be in [0, %d] (0: no weights), got %d",
             kMaxTopk, topk);
  DF_REQUIRE(num_tokens == 0 || (send_pos != 0 && (topk == 0 || out_weights != 0)),
             "dualflow_comm_combine: send_pos (and out_weights when topk > 0) must not be NULL");
  DF_REQUIRE(recv_prefix != 0, "dualflow_comm_combine: recv_prefix must not be NULL");
  DF_REQUIRE(rows % 16 == 0 && out % 16 == 0 && (width == 0 || out != 0 || num_tokens == 0),
             "dualflow_comm_combine: rows and out must be 16-byte aligned, out non-NULL");
  p.topk = topk;
  const int64_t message = combine_message_bytes(width * elem_bytes, p.topk);
  DF_REQUIRE(message <= sizing->slot_bytes,
             "dualflow_comm_combine: a message of %lld bytes does not fit the %lld-byte ring slots of this buffer "
             "(sized for rows of %lld bytes)", static_cast<long long>(message),
             static_cast<long long>(sizing->slot_bytes), static_cast<long long>(sizing->row_bytes));
  p.s = *sizing;
  p.rank = rank;
  p.elem_bytes = elem_bytes;
  p.num_tokens = num_tokens;
  p.row_bytes = width * elem_bytes;
  p.send_pos = reinterpret_cast<const int32_t*>(send_pos);
  p.recv_prefix = reinterpret_cast<const int32_t*>(recv_prefix);
  p.rows = reinterpret_cast<const uint8_t*>(rows);
  p.weights = reinterpret_cast<const float*>(weights);
  p.out = reinterpret_cast<uint8_t*>(out);
  p.out_weights = reinterpret_cast<float*>(out_weights);
  p.err = error_sink(*sizing, p.peers, rank, error, timeout_ns);
  combine_kernel<<<2 * sizing->num_channels, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  DF_CUDA(cudaGetLastError());
  return DUALFLOW_OK;
}
