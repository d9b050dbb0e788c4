// Dropout keep-masks from Philox (common/philox.cuh), the debug path that lets tests build a
// reference with exactly the mask the kernels regenerate: the tensor viewed as rows of its last
// dim, element (row, col) is kept when Philox::keep(seed, row, col, row_length, drop_threshold(p)).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastformer {
namespace dropout {

struct KeepMaskParams {
  const int64_t* seed;  // one int64 on the device (read by the kernel: no host sync)
  bool* keep;           // (numel,) out: rows of row_length
  int64_t numel, row_length;
  float dropout_p;
};

void launch_keep_mask(const KeepMaskParams& params, cudaStream_t stream);

}  // namespace dropout
}  // namespace fastformer
