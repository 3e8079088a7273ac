// Arithmetic shared by the host entry points and the kernels: channel partition of tokens, message
// layout of a ring slot, buffer sizing. Everything is __host__ __device__ so the CPU tests, through the
// C ABI, exercise exactly the code the kernels run.
#pragma once
#include <cstdint>

#include "comm/comm_api.h"

namespace dualflow::comm {

constexpr int kMaxRanks = DUALFLOW_COMM_MAX_RANKS;
constexpr int kMaxTopk = DUALFLOW_COMM_MAX_TOPK;
constexpr int kMaxLocalExperts = DUALFLOW_COMM_MAX_LOCAL_EXPERTS;
constexpr int kMaxChannels = DUALFLOW_COMM_MAX_CHANNELS;
constexpr int kMaxFields = DUALFLOW_COMM_MAX_FIELDS;
constexpr int kWindow = 32;       // rows published per tail update at most (one warp ballot of tokens)
constexpr int kMinSlots = 32;     // a ring holds at least one window and one batch of combine tokens
constexpr int kMaxSlots = 128;
constexpr int kThreads = 512;     // every block of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int64_t kAlign = 16;

__host__ __device__ inline int64_t pad16(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Channel c of C owns the contiguous tokens [begin, end); channels differ in size by at most one token
// and the first T % C channels get the extra one.
__host__ __device__ inline void channel_range(int64_t num_tokens, int num_channels, int channel, int64_t* begin,
                                              int64_t* end) {
  const int64_t q = num_tokens / num_channels, r = num_tokens % num_channels;
  *begin = channel * q + (channel < r ? channel : r);
  *end = *begin + q + (channel < r ? 1 : 0);
}

// The channel owning token t (inverse of channel_range).
__host__ __device__ inline int channel_of(int64_t num_tokens, int num_channels, int64_t t) {
  const int64_t q = num_tokens / num_channels, r = num_tokens % num_channels;
  const int64_t big = r * (q + 1);  // tokens in the first r channels, which hold q + 1 each
  return static_cast<int>(t < big ? t / (q + 1) : r + (t - big) / q);
}

// Byte layout of a dispatch message in a ring slot: the payload fields side by side, then the top-k
// ids rewritten to the destination's local experts (when sent), then the source token index. Each
// part starts at a 16-byte boundary.
struct MessageLayout {
  int64_t field_offset[kMaxFields];
  int64_t topk_offset;
  int64_t src_offset;
  int64_t bytes;
};

__host__ __device__ inline MessageLayout dispatch_message(int num_fields, const int64_t* field_bytes, int topk) {
  MessageLayout m{};
  int64_t pos = 0;
  for (int i = 0; i < num_fields; ++i) {
    m.field_offset[i] = pos;
    pos += pad16(field_bytes[i]);
  }
  m.topk_offset = pos;
  pos += pad16(static_cast<int64_t>(topk) * 8);
  m.src_offset = pos;
  m.bytes = pos + kAlign;
  return m;
}

// A combine message: one row of `row_bytes`, then `topk` FP32 weights (when sent).
__host__ __device__ inline int64_t combine_message_bytes(int64_t row_bytes, int topk) {
  return pad16(row_bytes) + pad16(static_cast<int64_t>(topk) * 4);
}

// Counts area of one source in the notify region: C channel counts then the local experts' counts.
__host__ __device__ inline int counts_stride(int num_channels) { return num_channels + kMaxLocalExperts; }

// Offsets of the per-rank buffer for a sizing (filled by dualflow_comm_buffer_size).
__host__ __device__ inline uint64_t* flag_ptr(uint8_t* base, const dualflow_comm_sizing& s, int src) {
  return reinterpret_cast<uint64_t*>(base + s.flags_offset) + src;
}
__host__ __device__ inline int32_t* counts_ptr(uint8_t* base, const dualflow_comm_sizing& s, int parity, int src) {
  return reinterpret_cast<int32_t*>(base + s.counts_offset) +
         (static_cast<int64_t>(parity) * s.num_ranks + src) * counts_stride(s.num_channels);
}
// Tail of the ring that `peer` fills in this buffer (channel c): written by the peer.
__host__ __device__ inline uint64_t* tail_ptr(uint8_t* base, const dualflow_comm_sizing& s, int peer, int c) {
  return reinterpret_cast<uint64_t*>(base + s.tails_offset) + peer * s.num_channels + c;
}
// Head of the ring this rank fills in `peer`'s buffer (channel c): written by the peer as it consumes.
__host__ __device__ inline uint64_t* head_ptr(uint8_t* base, const dualflow_comm_sizing& s, int peer, int c) {
  return reinterpret_cast<uint64_t*>(base + s.heads_offset) + peer * s.num_channels + c;
}
// Rows this rank ever pushed into `peer`'s ring c / ever consumed from `peer`'s ring c: local bookkeeping
// that lets counters grow forever instead of being reset (and re-synchronised) before every operation.
__host__ __device__ inline uint64_t* sent_ptr(uint8_t* base, const dualflow_comm_sizing& s, int peer, int c) {
  return reinterpret_cast<uint64_t*>(base + s.progress_offset) + peer * s.num_channels + c;
}
__host__ __device__ inline uint64_t* consumed_ptr(uint8_t* base, const dualflow_comm_sizing& s, int peer, int c) {
  return reinterpret_cast<uint64_t*>(base + s.progress_offset) + (s.num_ranks + peer) * s.num_channels + c;
}
__host__ __device__ inline uint32_t* error_claim_ptr(uint8_t* base, const dualflow_comm_sizing& s) {
  return reinterpret_cast<uint32_t*>(base + s.error_offset);
}
// Ring that `src` fills in this buffer for channel c.
__host__ __device__ inline uint8_t* ring_ptr(uint8_t* base, const dualflow_comm_sizing& s, int src, int c) {
  return base + s.rings_offset + (static_cast<int64_t>(src) * s.num_channels + c) * s.num_slots * s.slot_bytes;
}

}  // namespace dualflow::comm
