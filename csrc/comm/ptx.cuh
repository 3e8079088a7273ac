// Memory-ordering primitives of the dispatch/combine kernels, one inline-PTX instruction each.
//
// The kernels talk to peer GPUs through NVLink-mapped memory, so every ordering they rely on must hold
// at *system* scope (.sys): the producer writes a payload with ordinary stores, then publishes a counter
// with a release store; the consumer reads the counter with an acquire load and only then reads the
// payload. PTX's release is cumulative: writes by other threads of the block that were ordered before
// the release by a barrier (bar.sync / __syncwarp) are published with it, and an acquire followed by a
// barrier makes them visible to the other threads of the consumer block.
#pragma once
#include <cstdint>

namespace dualflow::comm {

// Store `value` to `ptr` (local or peer memory) so that every write the calling thread, or its block
// before a barrier, made earlier is visible to any thread of any GPU that reads `value` with an acquire.
__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t value) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(value) : "memory");
}

// Load from `ptr`; writes published by the release store that produced the value read are visible to
// the calling thread's later reads (and, after a barrier, to its block's).
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t value;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(value) : "l"(ptr) : "memory");
  return value;
}

// Relaxed load at system scope: always re-reads memory (no caching in registers or L1), no ordering.
// Used to poll flags whose ordering is established elsewhere.
__device__ __forceinline__ uint32_t ld_relaxed_sys(const uint32_t* ptr) {
  uint32_t value;
  asm volatile("ld.relaxed.sys.global.u32 %0, [%1];" : "=r"(value) : "l"(ptr) : "memory");
  return value;
}

// Nanoseconds of the GPU's global timer, comparable across the blocks of a GPU: the clock of the
// bounded waits (clock64 would count per-SM cycles at a varying frequency).
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Barrier of `num_threads` threads (a multiple of 32) on hardware barrier `id` (1..15; 0 is
// __syncthreads): lets one group of warps of a block synchronise without the others. Also orders the
// group's memory accesses like __syncthreads does for the block.
__device__ __forceinline__ void group_barrier(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

// 16-byte global loads/stores that bypass L1 on the read side: ring slots are rewritten by peers, so a
// stale L1 line must never be served (.cv: "cache as volatile", re-fetch every time).
__device__ __forceinline__ int4 ld_volatile_v4(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.cv.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ int ld_volatile_s32(const int* ptr) {
  int v;
  asm volatile("ld.global.cv.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

}  // namespace dualflow::comm
