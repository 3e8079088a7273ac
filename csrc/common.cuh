// Shared host-side helpers of libdualflow_cuda: error recording and CUDA return-code checks.
#pragma once
#include <cuda_runtime.h>

#include <cstdarg>
#include <cstdio>
#include <string>

#include "dualflow_cuda.h"

namespace dualflow {

// Records a printf-style message as this thread's last error and returns the code.
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void clear_error();

inline int check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return DUALFLOW_OK;
  return set_error(DUALFLOW_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(err), cudaGetErrorName(err));
}

}  // namespace dualflow

// Returns from the enclosing C ABI function with the error recorded when a CUDA call fails.
#define DF_CUDA(call)                                                   \
  do {                                                                  \
    int df_rc_ = ::dualflow::check_cuda((call), #call);                 \
    if (df_rc_ != DUALFLOW_OK) return df_rc_;                           \
  } while (0)

#define DF_REQUIRE(cond, ...)                                                       \
  do {                                                                              \
    if (!(cond)) return ::dualflow::set_error(DUALFLOW_ERR_INVALID_ARGUMENT, __VA_ARGS__); \
  } while (0)
