// Device helpers shared by the notify, dispatch and combine kernels: peer pointers, bounded waits with
// error reporting, warp copies of rows.
#pragma once
#include <cstdint>

#include "comm/layout.cuh"
#include "comm/ptx.cuh"

namespace dualflow::comm {

// Phases named in error records (docs/comm_kernels.md lists them; dualflow/comm/kernels.py mirrors them).
enum Phase : int32_t {
  kPhaseNotify = 1,        // waiting for a peer's notify flag
  kPhaseDispatchSend = 2,  // dispatch sender waiting for free slots (the peer's head)
  kPhaseDispatchRecv = 3,  // dispatch receiver waiting for rows (the peer's tail)
  kPhaseCombineSend = 4,
  kPhaseCombineRecv = 5,
};

struct Peers {
  uint8_t* ptr[kMaxRanks];
};

// Where a failed wait is recorded: `claim` (device memory of this rank) elects the first failing thread,
// which fills `record` (mapped host memory: code, rank, channel, phase, peer, expected, seen, 0).
struct ErrorSink {
  int32_t* record;
  uint32_t* claim;
  int32_t rank;
  uint64_t timeout_ns;
};

__device__ inline void report_timeout(const ErrorSink& e, int channel, int phase, int peer, uint64_t expected,
                                      uint64_t seen) {
  if (atomicCAS(e.claim, 0u, 1u) != 0u) return;  // an earlier failure of this rank is already recorded
  volatile int32_t* r = e.record;
  r[1] = e.rank;
  r[2] = channel;
  r[3] = phase;
  r[4] = peer;
  r[5] = static_cast<int32_t>(expected);
  r[6] = static_cast<int32_t>(seen);
  __threadfence_system();
  r[0] = DUALFLOW_ERR_TIMEOUT;  // written last: the host reads the code first
  __threadfence_system();
}

// Spins until the counter at `counter` reaches `target` (acquire: the data published with it becomes
// visible). Returns false, after recording the error, when `timeout_ns` passes; returns false at once
// when another block of this rank already failed, so that one failure ends the whole kernel quickly.
__device__ inline bool wait_at_least(const uint64_t* counter, uint64_t target, const ErrorSink& e, int channel,
                                     int phase, int peer, uint64_t* seen) {
  const uint64_t start = global_timer_ns();
  for (;;) {
    const uint64_t value = ld_acquire_sys(counter);
    if (value >= target) {
      *seen = value;
      return true;
    }
    if (ld_relaxed_sys(e.claim) != 0u) return false;
    if (global_timer_ns() - start > e.timeout_ns) {
      report_timeout(e, channel, phase, peer, target, value);
      return false;
    }
  }
}

// Copies `bytes` (a multiple of 4) with the 32 lanes of a warp: 16-byte vectors when both ends and the
// size allow it, 4-byte words otherwise. `from_ring`: the source is a ring slot rewritten by peers, read
// with cache-volatile loads.
__device__ inline void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane, bool from_ring) {
  if (((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src) | static_cast<uintptr_t>(bytes)) & 15) ==
      0) {
    for (int64_t i = lane * 16; i < bytes; i += 32 * 16) {
      const int4* s = reinterpret_cast<const int4*>(src + i);
      *reinterpret_cast<int4*>(dst + i) = from_ring ? ld_volatile_v4(s) : *s;
    }
  } else {
    for (int64_t i = lane * 4; i < bytes; i += 32 * 4) {
      const int* s = reinterpret_cast<const int*>(src + i);
      *reinterpret_cast<int*>(dst + i) = from_ring ? ld_volatile_s32(s) : *s;
    }
  }
}

// Index of the n-th (0-based) set bit of mask; mask has more than n bits set.
__device__ inline int nth_set_bit(uint32_t mask, int n) {
  for (int i = 0; i < n; ++i) mask &= mask - 1;
  return __ffs(mask) - 1;
}

// Warps of a block split into one group per rank (kWarps / R warps each; leftover warps idle).
struct Groups {
  int warps_per_group, group, warp_in_group, lane;
  __device__ explicit Groups(int num_ranks)
      : warps_per_group(kWarps / num_ranks),
        group(static_cast<int>(threadIdx.x / 32) / (kWarps / num_ranks)),
        warp_in_group(static_cast<int>(threadIdx.x / 32) % (kWarps / num_ranks)),
        lane(static_cast<int>(threadIdx.x % 32)) {}
  __device__ bool leader() const { return warp_in_group == 0 && lane == 0; }
  __device__ void sync() const { group_barrier(1 + group, warps_per_group * 32); }
};

// Launcher helpers (host.cu): the checks every kernel entry point shares, and its error sink.
int check_common(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank, int64_t num_tokens,
                 uintptr_t error, const char* who, Peers* out);
ErrorSink error_sink(const dualflow_comm_sizing& s, const Peers& peers, int rank, uintptr_t error, uint64_t timeout_ns);

// Ends of one ring as seen by its sender: slots and tail in the receiver's buffer, head and the running
// row count in the sender's own buffer.
struct SendEnds {
  uint8_t* ring;
  uint64_t* remote_tail;
  const uint64_t* head;
  uint64_t* sent;
};

// Pushes the candidates i in [begin, end) with pred(i) into a peer's ring, in order, in windows of up to
// 32 (one ballot): wait for room (the peer's head), write each message with write(i, slot, position),
// then publish the window with a release store of the tail. Position counts this call's messages.
// Returns false when a wait failed. `flag`: one shared word of the calling group.
template <typename Pred, typename Write>
__device__ bool push_rows(const Groups& g, const dualflow_comm_sizing& s, const SendEnds& ends, int64_t begin,
                          int64_t end, Pred pred, Write write, const ErrorSink& e, int channel, int phase, int peer,
                          volatile uint64_t* flag) {
  const uint64_t base = *ends.sent;
  uint64_t rows = 0;
  for (int64_t w0 = begin; w0 < end; w0 += 32) {
    const int64_t i = w0 + g.lane;
    const uint32_t mask = __ballot_sync(0xffffffffu, i < end && pred(i));  // the same in every warp of the group
    const int n = __popc(mask);
    if (n == 0) continue;
    if (g.leader()) {
      const uint64_t need = base + rows + n;  // the slot of message `need - 1` must have been consumed
      uint64_t seen = 0;
      *flag = need <= static_cast<uint64_t>(s.num_slots) ||
                      wait_at_least(ends.head, need - s.num_slots, e, channel, phase, peer, &seen)
                  ? 0
                  : 1;
    }
    g.sync();
    if (*flag) return false;
    for (int j = g.warp_in_group; j < n; j += g.warps_per_group) {
      write(w0 + nth_set_bit(mask, j), ends.ring + ((base + rows + j) % s.num_slots) * s.slot_bytes, rows + j);
    }
    g.sync();  // every message of the window is written before the tail says so
    if (g.leader()) st_release_sys(ends.remote_tail, base + rows + n);
    rows += n;
  }
  if (g.leader()) *ends.sent = base + rows;
  return true;
}

// Ends of one ring as seen by its receiver: slots and tail in its own buffer, head in the sender's.
struct RecvEnds {
  const uint8_t* ring;
  const uint64_t* tail;
  uint64_t* remote_head;
  uint64_t* consumed;
};

// Pops `count` messages from a ring in order: wait for published rows (the tail), hand each to
// read(index, slot), then free the slots with a release store of the head. Returns false when a wait
// failed. `value`: one shared word of the calling group.
template <typename Read>
__device__ bool pop_rows(const Groups& g, const dualflow_comm_sizing& s, const RecvEnds& ends, int64_t count, Read read,
                         const ErrorSink& e, int channel, int phase, int peer, volatile uint64_t* value) {
  const uint64_t base = *ends.consumed;
  int64_t done = 0;
  while (done < count) {
    if (g.leader()) {
      uint64_t seen = 0;
      const bool ok = wait_at_least(ends.tail, base + done + 1, e, channel, phase, peer, &seen);
      const uint64_t ready = seen - base - done, left = count - done;
      *value = ok ? (ready < left ? ready : left) : 0;
    }
    g.sync();
    const int64_t avail = static_cast<int64_t>(*value);
    if (avail == 0) return false;
    for (int64_t j = g.warp_in_group; j < avail; j += g.warps_per_group) {
      read(done + j, ends.ring + ((base + done + j) % s.num_slots) * s.slot_bytes);
    }
    g.sync();  // every slot of the batch is read before the head frees it
    done += avail;
    if (g.leader()) st_release_sys(ends.remote_head, base + done);
  }
  if (g.leader()) *ends.consumed = base + count;
  return true;
}

}  // namespace dualflow::comm
