// C ABI of the intranode MoE dispatch/combine kernels (csrc/comm), the `kernels` backend of dualflow.comm.
// Conventions of dualflow_cuda.h: every function returns a dualflow_status and leaves its message in
// dualflow_last_error(); device pointers and cudaStream_t cross as integers. docs/comm_kernels.md has
// the protocol (buffers, counters, ordering) these functions implement.
//
// Every rank owns one buffer of dualflow_comm_buffer_size()'s total_bytes, mapped by every peer of the
// node (symmetric memory or CUDA IPC); `peers[r]` is rank r's buffer as seen from this GPU (peers[rank]
// is the local one). The buffer must be zeroed on every rank before the first call.
#pragma once
#include "dualflow_cuda.h"

#ifdef __cplusplus
extern "C" {
#endif

#define DUALFLOW_COMM_MAX_RANKS 8
#define DUALFLOW_COMM_MAX_TOPK 32
#define DUALFLOW_COMM_MAX_LOCAL_EXPERTS 512
#define DUALFLOW_COMM_MAX_CHANNELS 64
#define DUALFLOW_COMM_MAX_FIELDS 4

// Geometry of the per-rank buffer: sizes and byte offsets of its regions (see docs/comm_kernels.md).
typedef struct dualflow_comm_sizing {
  int32_t num_ranks;
  int32_t num_channels;   // num_sms / 2: one sender and one receiver block per channel
  int32_t num_slots;      // slots per ring
  int32_t topk;
  int64_t hidden;
  int64_t max_tokens;     // tokens per rank per call, at most
  int64_t row_bytes;      // largest payload row a message may carry (2 or 4 bytes per element)
  int64_t slot_bytes;     // one ring slot: the largest dispatch or combine message
  int64_t flags_offset;   // [R] u64 notify flags, written by each source
  int64_t counts_offset;  // [2][R][C + MAX_LOCAL_EXPERTS] i32 notify counts (double-buffered by epoch parity)
  int64_t tails_offset;   // [R][C] u64 tails of the rings in this buffer, written by their senders
  int64_t heads_offset;   // [R][C] u64 heads of this rank's rings in peer buffers, written by those peers
  int64_t progress_offset;  // [2][R][C] u64 rows ever sent / consumed per ring (local bookkeeping)
  int64_t error_offset;   // u32 claim word of the first error of this rank
  int64_t rings_offset;   // [R][C][num_slots][slot_bytes] rings filled by each source rank
  int64_t total_bytes;
} dualflow_comm_sizing;

// sizeof(dualflow_comm_sizing): lets bindings check their mirror of the struct.
DUALFLOW_API int dualflow_comm_sizing_bytes(int64_t* bytes);

// ---- pure host (no GPU needed) ---------------------------------------------------------------------

// Sizes the buffer for `hidden`-wide rows, up to `max_tokens` tokens per call, `topk` experts per token,
// `num_ranks` ranks and `num_sms` SMs (num_sms / 2 channels). fp8 != 0: dispatch payloads are FP8 with
// 1x128 scales and every other row is BF16; fp8 == 0: rows are BF16 or FP32. Fails with the reason when
// the configuration is invalid or needs more than max_bytes bytes (max_bytes <= 0: no limit).
DUALFLOW_API int dualflow_comm_buffer_size(int64_t hidden, int64_t max_tokens, int topk, int num_ranks, int num_sms,
                                           int fp8, int64_t max_bytes, dualflow_comm_sizing* out);

// Tokens [begin, end) of channel `channel` of `num_channels` for `num_tokens` tokens.
DUALFLOW_API int dualflow_comm_channel_range(int64_t num_tokens, int num_channels, int channel, int64_t* begin,
                                             int64_t* end);

// The routing arithmetic the notify and dispatch kernels do, on host arrays: for topk_idx [T, k] (-1 =
// none) and experts split evenly over num_ranks ranks: tokens per rank [R], (token, slot) pairs per
// expert [E], is_token_in_rank [T, R] (0/1), rows per (destination rank, channel) [R, C], and send_pos
// [T, R]: the position of token t's row among the rows of its channel sent to rank r (-1 if not sent).
DUALFLOW_API int dualflow_comm_layout_host(const int64_t* topk_idx, int64_t num_tokens, int topk, int64_t num_experts,
                                           int num_ranks, int num_channels, int32_t* num_tokens_per_rank,
                                           int32_t* num_tokens_per_expert, uint8_t* is_token_in_rank,
                                           int32_t* channel_counts, int32_t* send_pos);

// The receiver's prefix matrix from counts [R_src, C] (rows each source sends it per channel): prefix
// [R * C + 1], rows from source s in channel c land at [prefix[s*C + c], prefix[s*C + c + 1]).
DUALFLOW_API int dualflow_comm_recv_prefix_host(const int32_t* counts, int num_ranks, int num_channels,
                                                int32_t* prefix);

// ---- memory ----------------------------------------------------------------------------------------

// Pinned host memory mapped into the device address space (the kernels publish totals and errors there).
DUALFLOW_API int dualflow_comm_alloc_mapped(size_t bytes, uintptr_t* host_ptr, uintptr_t* device_ptr);
DUALFLOW_API int dualflow_comm_free_mapped(uintptr_t host_ptr);
// Device memory with a CUDA IPC handle (64 bytes written to `handle`), the fallback of symmetric memory.
DUALFLOW_API int dualflow_comm_ipc_alloc(size_t bytes, uintptr_t* ptr, uint8_t* handle);
DUALFLOW_API int dualflow_comm_ipc_open(const uint8_t* handle, uintptr_t* ptr);
DUALFLOW_API int dualflow_comm_ipc_close(uintptr_t ptr);
DUALFLOW_API int dualflow_comm_free(uintptr_t ptr);

// How this process shares CUDA device `device` with others: out[0] its SM count, out[1] 1 when this
// process is an MPS client (kernels of several processes run at once) and 0 when contexts are time-sliced,
// out[2] the SMs this process's context may use (its MPS limit; out[0] without MPS). Makes the device
// current on the calling thread.
DUALFLOW_API int dualflow_comm_device_sharing(int device, int32_t* out);

// ---- kernels (stream-ordered; `error` is mapped host memory of 8 int32: code, rank, channel, phase,
// peer, expected, seen, 0; a wait longer than timeout_ns fills it and ends the kernel) -------------------

// Exchanges this rank's counts with every peer through their buffers and computes, on the device,
// recv_prefix [R*C + 1] (i32) and the totals the host needs, written to mapped host memory `totals`
// (i32 [1 + R + E/R]: rows received, rows from each source, (row, slot) pairs per local expert).
// is_token_in_rank: u8 [T, R]; topk_idx: i64 [T, k]. `epoch` grows by one per notify (starting at 1).
DUALFLOW_API int dualflow_comm_notify(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                      uintptr_t is_token_in_rank, uintptr_t topk_idx, int64_t num_tokens, int topk,
                                      int64_t num_experts, uint64_t epoch, uintptr_t recv_prefix, uintptr_t totals,
                                      uint64_t timeout_ns, uintptr_t error, uintptr_t stream);

// Sends each token's row once to every rank in its row of is_token_in_rank, on exactly num_sms blocks.
// Fields: num_fields byte arrays src[i] [T, bytes[i]] -> dst[i] [N, bytes[i]] (bytes multiples of 4).
// topk > 0: topk_idx (i64 [T, topk], global ids) travels along and arrives rewritten to local ids in
// recv_topk_idx [N, topk]; topk = 0: no ids are sent (cached routing); every rank passes the same topk.
// recv_src_idx (i32 [N]) gets source token indices; send_pos (i32 [T, R], preset to -1) is written (see
// layout_host). Pointers of empty arrays may be NULL.
DUALFLOW_API int dualflow_comm_dispatch(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                        int64_t num_tokens, uintptr_t is_token_in_rank, uintptr_t recv_prefix,
                                        int num_fields, const uintptr_t* src, const uintptr_t* dst,
                                        const int64_t* bytes, uintptr_t topk_idx, int topk, int64_t num_local_experts,
                                        uintptr_t recv_topk_idx, uintptr_t recv_src_idx, uintptr_t send_pos,
                                        uint64_t timeout_ns, uintptr_t error, uintptr_t stream);

// Returns rows [N, width] (elem_bytes 2: BF16, 4: FP32) to their source ranks and adds, per token, the
// rows of every rank in ascending rank order in FP32 from +0.0 into out [T, width] (same dtype). topk > 0:
// weights (f32 [N, topk]) are added the same way into out_weights [T, topk]; 0: no weights (every rank
// passes the same topk). send_pos and recv_prefix come from the dispatch whose rows these are.
DUALFLOW_API int dualflow_comm_combine(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank,
                                       int64_t num_tokens, uintptr_t send_pos, uintptr_t recv_prefix, uintptr_t rows,
                                       int64_t width, int elem_bytes, uintptr_t weights, int topk, uintptr_t out,
                                       uintptr_t out_weights, uint64_t timeout_ns, uintptr_t error, uintptr_t stream);

#ifdef __cplusplus
}
#endif
