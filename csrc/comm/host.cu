// Host entry points of the comm kernels: buffer sizing, the routing arithmetic on host arrays (the same
// functions the kernels call), and the memory the kernels need (mapped host memory, CUDA IPC).
#include <cudaTypedefs.h>  // driver API function types only: the driver is reached through cudart

#include <cstring>

#include "common.cuh"
#include "comm/device.cuh"

namespace dc = dualflow::comm;

namespace dualflow::comm {

// Host-side checks shared by the launchers: the buffer geometry and the peer table.
int check_common(const dualflow_comm_sizing* sizing, const uintptr_t* peers, int rank, int64_t num_tokens,
                 uintptr_t error, const char* who, Peers* out) {
  DF_REQUIRE(sizing != nullptr && peers != nullptr, "%s: sizing and peers must not be NULL", who);
  const int R = sizing->num_ranks;
  DF_REQUIRE(R >= 1 && R <= kMaxRanks && sizing->num_channels >= 1 && sizing->num_channels <= kMaxChannels &&
                 sizing->num_slots >= kMinSlots && sizing->slot_bytes > 0 && sizing->slot_bytes % kAlign == 0,
             "%s: the sizing is not one made by dualflow_comm_buffer_size", who);
  DF_REQUIRE(rank >= 0 && rank < R, "%s: rank %d outside [0, %d)", who, rank, R);
  DF_REQUIRE(num_tokens >= 0 && num_tokens <= sizing->max_tokens,
             "%s: %lld tokens, the buffer was sized for at most %lld per rank", who, static_cast<long long>(num_tokens),
             static_cast<long long>(sizing->max_tokens));
  DF_REQUIRE(error != 0, "%s: the error record (mapped host memory) must not be NULL", who);
  for (int r = 0; r < R; ++r) {
    DF_REQUIRE(peers[r] != 0 && peers[r] % 256 == 0, "%s: buffer of rank %d is NULL or not 256-byte aligned", who, r);
    out->ptr[r] = reinterpret_cast<uint8_t*>(peers[r]);
  }
  return DUALFLOW_OK;
}

ErrorSink error_sink(const dualflow_comm_sizing& s, const Peers& peers, int rank, uintptr_t error, uint64_t timeout_ns) {
  return ErrorSink{reinterpret_cast<int32_t*>(error), error_claim_ptr(peers.ptr[rank], s), rank, timeout_ns};
}

}  // namespace dualflow::comm

extern "C" {

int dualflow_comm_sizing_bytes(int64_t* bytes) {
  DF_REQUIRE(bytes != nullptr, "dualflow_comm_sizing_bytes: bytes is NULL");
  *bytes = static_cast<int64_t>(sizeof(dualflow_comm_sizing));
  return DUALFLOW_OK;
}

int dualflow_comm_buffer_size(int64_t hidden, int64_t max_tokens, int topk, int num_ranks, int num_sms, int fp8,
                              int64_t max_bytes, dualflow_comm_sizing* out) {
  DF_REQUIRE(out != nullptr, "dualflow_comm_buffer_size: out is NULL");
  DF_REQUIRE(num_ranks >= 1 && num_ranks <= dc::kMaxRanks,
             "the kernels backend runs on 1 to %d ranks of one NVLink node, got %d ranks; use the torch backend",
             dc::kMaxRanks, num_ranks);
  DF_REQUIRE(num_sms >= 2 && num_sms % 2 == 0 && num_sms / 2 <= dc::kMaxChannels,
             "num_sms must be even and in [2, %d] (pairs of SMs form channels), got %d", 2 * dc::kMaxChannels,
             num_sms);
  DF_REQUIRE(topk >= 1 && topk <= dc::kMaxTopk, "top-k must be in [1, %d] for the kernels backend, got %d",
             dc::kMaxTopk, topk);
  DF_REQUIRE(hidden >= 8 && hidden % 8 == 0 && hidden <= (1 << 20),
             "hidden must be a multiple of 8 in [8, 2^20] for the kernels backend (rows move in 16-byte "
             "vectors), got %lld", static_cast<long long>(hidden));
  DF_REQUIRE(!fp8 || hidden % 128 == 0, "FP8 payloads need hidden to be a multiple of 128, got %lld",
             static_cast<long long>(hidden));
  DF_REQUIRE(max_tokens >= 1 && max_tokens <= (int64_t{1} << 30),
             "max_tokens must be in [1, 2^30], got %lld", static_cast<long long>(max_tokens));
  dualflow_comm_sizing s{};
  s.num_ranks = num_ranks;
  s.num_channels = num_sms / 2;
  s.topk = topk;
  s.hidden = hidden;
  s.max_tokens = max_tokens;
  s.row_bytes = hidden * (fp8 ? 2 : 4);
  // A ring never needs more slots than a channel has tokens; past kMaxSlots the sender waits for the
  // receiver (flow control) instead of using more memory.
  const int64_t per_channel = (max_tokens + s.num_channels - 1) / s.num_channels;
  const int64_t slots = (per_channel + dc::kWindow - 1) / dc::kWindow * dc::kWindow;
  s.num_slots = static_cast<int32_t>(slots < dc::kMinSlots ? dc::kMinSlots : slots > dc::kMaxSlots ? dc::kMaxSlots : slots);
  // Largest message: a dispatch of a full row with weights and top-k ids (a combine message is smaller).
  const int64_t fields[2] = {s.row_bytes, 4 * static_cast<int64_t>(topk)};
  s.slot_bytes = dc::dispatch_message(2, fields, topk).bytes;
  const int64_t rc = static_cast<int64_t>(num_ranks) * s.num_channels;
  int64_t pos = 0;
  auto region = [&pos](int64_t bytes) {
    const int64_t at = pos;
    pos += (bytes + 255) / 256 * 256;
    return at;
  };
  s.flags_offset = region(8 * static_cast<int64_t>(num_ranks));
  s.counts_offset = region(4 * 2 * static_cast<int64_t>(num_ranks) * dc::counts_stride(s.num_channels));
  s.tails_offset = region(8 * rc);
  s.heads_offset = region(8 * rc);
  s.progress_offset = region(8 * 2 * rc);
  s.error_offset = region(8);
  s.rings_offset = region(0);
  s.total_bytes = s.rings_offset + rc * s.num_slots * s.slot_bytes;
  DF_REQUIRE(max_bytes <= 0 || s.total_bytes <= max_bytes,
             "the kernels backend needs %lld bytes per rank for hidden=%lld, max_tokens=%lld, top-k=%d, %d ranks, "
             "num_sms=%d (%d slots of %lld bytes per ring), more than the %lld allowed: lower num_sms or "
             "max_tokens_per_rank, or allow more memory",
             static_cast<long long>(s.total_bytes), static_cast<long long>(hidden), static_cast<long long>(max_tokens),
             topk, num_ranks, num_sms, s.num_slots, static_cast<long long>(s.slot_bytes),
             static_cast<long long>(max_bytes));
  *out = s;
  return DUALFLOW_OK;
}

int dualflow_comm_channel_range(int64_t num_tokens, int num_channels, int channel, int64_t* begin, int64_t* end) {
  DF_REQUIRE(begin != nullptr && end != nullptr, "dualflow_comm_channel_range: begin/end is NULL");
  DF_REQUIRE(num_tokens >= 0 && num_channels >= 1 && channel >= 0 && channel < num_channels,
             "dualflow_comm_channel_range: need num_tokens >= 0 and 0 <= channel < num_channels, got %lld, %d, %d",
             static_cast<long long>(num_tokens), channel, num_channels);
  dc::channel_range(num_tokens, num_channels, channel, begin, end);
  return DUALFLOW_OK;
}

int dualflow_comm_layout_host(const int64_t* topk_idx, int64_t num_tokens, int topk, int64_t num_experts, int num_ranks,
                              int num_channels, int32_t* num_tokens_per_rank, int32_t* num_tokens_per_expert,
                              uint8_t* is_token_in_rank, int32_t* channel_counts, int32_t* send_pos) {
  DF_REQUIRE(num_tokens >= 0 && topk >= 1 && num_ranks >= 1 && num_channels >= 1,
             "dualflow_comm_layout_host: need num_tokens >= 0, topk >= 1, num_ranks >= 1, num_channels >= 1");
  DF_REQUIRE(num_experts >= num_ranks && num_experts % num_ranks == 0,
             "dualflow_comm_layout_host: num_experts=%lld is not a positive multiple of num_ranks=%d",
             static_cast<long long>(num_experts), num_ranks);
  DF_REQUIRE((topk_idx != nullptr || num_tokens == 0) && num_tokens_per_rank && num_tokens_per_expert &&
                 ((is_token_in_rank && send_pos) || num_tokens == 0) && channel_counts,
             "dualflow_comm_layout_host: an array argument is NULL");
  const int64_t per_rank = num_experts / num_ranks;
  for (int64_t i = 0; i < num_tokens * topk; ++i)
    DF_REQUIRE(topk_idx[i] >= -1 && topk_idx[i] < num_experts,
               "dualflow_comm_layout_host: expert index %lld of token %lld outside [-1, %lld)",
               static_cast<long long>(topk_idx[i]), static_cast<long long>(i / topk),
               static_cast<long long>(num_experts));
  memset(num_tokens_per_rank, 0, sizeof(int32_t) * num_ranks);
  memset(num_tokens_per_expert, 0, sizeof(int32_t) * num_experts);
  memset(channel_counts, 0, sizeof(int32_t) * num_ranks * num_channels);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int c = dc::channel_of(num_tokens, num_channels, t);
    for (int r = 0; r < num_ranks; ++r) is_token_in_rank[t * num_ranks + r] = 0;
    for (int j = 0; j < topk; ++j) {
      const int64_t e = topk_idx[t * topk + j];
      if (e < 0) continue;
      ++num_tokens_per_expert[e];
      is_token_in_rank[t * num_ranks + e / per_rank] = 1;
    }
    for (int r = 0; r < num_ranks; ++r) {
      const bool in = is_token_in_rank[t * num_ranks + r];
      // Rows of a channel reach a rank in token order: the position is the count so far.
      send_pos[t * num_ranks + r] = in ? channel_counts[r * num_channels + c]++ : -1;
      num_tokens_per_rank[r] += in;
    }
  }
  return DUALFLOW_OK;
}

int dualflow_comm_recv_prefix_host(const int32_t* counts, int num_ranks, int num_channels, int32_t* prefix) {
  DF_REQUIRE(counts != nullptr && prefix != nullptr, "dualflow_comm_recv_prefix_host: NULL argument");
  DF_REQUIRE(num_ranks >= 1 && num_channels >= 1, "dualflow_comm_recv_prefix_host: need num_ranks, num_channels >= 1");
  prefix[0] = 0;
  for (int i = 0; i < num_ranks * num_channels; ++i) {
    DF_REQUIRE(counts[i] >= 0, "dualflow_comm_recv_prefix_host: negative count %d at %d", counts[i], i);
    prefix[i + 1] = prefix[i] + counts[i];
  }
  return DUALFLOW_OK;
}

int dualflow_comm_alloc_mapped(size_t bytes, uintptr_t* host_ptr, uintptr_t* device_ptr) {
  DF_REQUIRE(host_ptr != nullptr && device_ptr != nullptr && bytes > 0, "dualflow_comm_alloc_mapped: bad arguments");
  void* host = nullptr;
  DF_CUDA(cudaHostAlloc(&host, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  memset(host, 0, bytes);
  void* dev = nullptr;
  const int rc = dualflow::check_cuda(cudaHostGetDevicePointer(&dev, host, 0), "cudaHostGetDevicePointer");
  if (rc != DUALFLOW_OK) {
    cudaFreeHost(host);
    return rc;
  }
  *host_ptr = reinterpret_cast<uintptr_t>(host);
  *device_ptr = reinterpret_cast<uintptr_t>(dev);
  return DUALFLOW_OK;
}

int dualflow_comm_free_mapped(uintptr_t host_ptr) {
  if (host_ptr != 0) DF_CUDA(cudaFreeHost(reinterpret_cast<void*>(host_ptr)));
  return DUALFLOW_OK;
}

int dualflow_comm_ipc_alloc(size_t bytes, uintptr_t* ptr, uint8_t* handle) {
  DF_REQUIRE(ptr != nullptr && handle != nullptr && bytes > 0, "dualflow_comm_ipc_alloc: bad arguments");
  void* dev = nullptr;
  // Whole 2 MiB pages: an IPC mapping covers the pages of the allocation, so two buffers of one process
  // sharing a page make a peer that still maps the first (a buffer abandoned after a timeout) fail to
  // open the second with cudaErrorAlreadyMapped (seen with 4 ranks sharing an H200).
  constexpr size_t kPage = size_t(2) << 20;
  DF_CUDA(cudaMalloc(&dev, (bytes + kPage - 1) / kPage * kPage));
  cudaIpcMemHandle_t h;
  const int rc = dualflow::check_cuda(cudaIpcGetMemHandle(&h, dev), "cudaIpcGetMemHandle");
  if (rc != DUALFLOW_OK) {
    cudaFree(dev);
    return rc;
  }
  static_assert(sizeof(h) == 64, "CUDA IPC handles are 64 bytes");
  memcpy(handle, &h, sizeof(h));
  *ptr = reinterpret_cast<uintptr_t>(dev);
  return DUALFLOW_OK;
}

int dualflow_comm_ipc_open(const uint8_t* handle, uintptr_t* ptr) {
  DF_REQUIRE(handle != nullptr && ptr != nullptr, "dualflow_comm_ipc_open: NULL argument");
  cudaIpcMemHandle_t h;
  memcpy(&h, handle, sizeof(h));
  void* dev = nullptr;
  DF_CUDA(cudaIpcOpenMemHandle(&dev, h, cudaIpcMemLazyEnablePeerAccess));
  *ptr = reinterpret_cast<uintptr_t>(dev);
  return DUALFLOW_OK;
}

int dualflow_comm_ipc_close(uintptr_t ptr) {
  if (ptr != 0) DF_CUDA(cudaIpcCloseMemHandle(reinterpret_cast<void*>(ptr)));
  return DUALFLOW_OK;
}

int dualflow_comm_free(uintptr_t ptr) {
  if (ptr != 0) DF_CUDA(cudaFree(reinterpret_cast<void*>(ptr)));
  return DUALFLOW_OK;
}

int dualflow_comm_device_sharing(int device, int32_t* out) {
  DF_REQUIRE(out != nullptr, "dualflow_comm_device_sharing: out is NULL");
  DF_CUDA(cudaSetDevice(device));
  DF_CUDA(cudaFree(nullptr));  // the primary context exists and is current: the affinity query needs one
  int sms = 0;
  DF_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Execution affinity (an SM limit per context) exists only for MPS clients (Volta+ MPS), so its
  // support tells whether this process is one; the library does not link libcuda, hence entry points.
  PFN_cuDeviceGet_v2000 device_get = nullptr;
  PFN_cuDeviceGetExecAffinitySupport_v11040 support = nullptr;
  PFN_cuCtxGetExecAffinity_v11040 affinity = nullptr;
  cudaDriverEntryPointQueryResult found[3];
  DF_CUDA(cudaGetDriverEntryPointByVersion("cuDeviceGet", reinterpret_cast<void**>(&device_get), 2000,
                                           cudaEnableDefault, &found[0]));
  DF_CUDA(cudaGetDriverEntryPointByVersion("cuDeviceGetExecAffinitySupport", reinterpret_cast<void**>(&support),
                                           11040, cudaEnableDefault, &found[1]));
  DF_CUDA(cudaGetDriverEntryPointByVersion("cuCtxGetExecAffinity", reinterpret_cast<void**>(&affinity), 11040,
                                           cudaEnableDefault, &found[2]));
  DF_REQUIRE(found[0] == cudaDriverEntryPointSuccess && found[1] == cudaDriverEntryPointSuccess &&
                 found[2] == cudaDriverEntryPointSuccess,
             "dualflow_comm_device_sharing: the driver lacks cuDeviceGetExecAffinitySupport/cuCtxGetExecAffinity "
             "(CUDA 11.4+ drivers have them); update the driver");
  CUdevice dev = 0;
  int supported = 0;
  DF_REQUIRE(device_get(&dev, device) == CUDA_SUCCESS &&
                 support(&supported, CU_EXEC_AFFINITY_TYPE_SM_COUNT, dev) == CUDA_SUCCESS,
             "dualflow_comm_device_sharing: the driver could not say whether device %d runs MPS clients", device);
  // A context outside MPS has no affinity to report (CUDA_ERROR_UNSUPPORTED_EXEC_AFFINITY): both answers
  // must agree before the process counts as an MPS client.
  CUexecAffinityParam param{};
  const bool mps = supported && affinity(&param, CU_EXEC_AFFINITY_TYPE_SM_COUNT) == CUDA_SUCCESS;
  const int client_sms = mps ? static_cast<int>(param.param.smCount.val) : sms;
  out[0] = sms;
  out[1] = mps ? 1 : 0;
  out[2] = client_sms;
  return DUALFLOW_OK;
}

}  // extern "C"
