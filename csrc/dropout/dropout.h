// Dropout keep-masks from Philox (common/philox.cuh), the debug path that lets tests build a
// reference with exactly the mask the kernels regenerate: element i of the flattened tensor is
// kept when Philox::keep(seed, i, p).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastformer {
namespace dropout {

struct KeepMaskParams {
  const int64_t* seed;  // one int64 on the device (read by the kernel: no host sync)
  bool* keep;           // (numel,) out
  int64_t numel;
  float dropout_p;
};

void launch_keep_mask(const KeepMaskParams& params, cudaStream_t stream);

}  // namespace dropout
}  // namespace fastformer
