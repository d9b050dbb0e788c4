// The dropout keep-mask kernel: one thread per element, the same Philox function as every
// kernel that applies dropout (element i of the flattened tensor is (i / N, i % N) of its rows).
#include "common/kernel_runtime.cuh"
#include "common/philox.cuh"
#include "dropout/dropout.h"

namespace fastformer {
namespace dropout {

__global__ void keep_mask_kernel(const KeepMaskParams p) {
  const uint64_t seed = static_cast<uint64_t>(*p.seed);
  const uint32_t drop_threshold = Philox::drop_threshold(p.dropout_p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.numel;
       i += stride) {
    p.keep[i] = Philox::keep(seed, static_cast<uint64_t>(i / p.row_length), static_cast<uint64_t>(i % p.row_length),
                             static_cast<uint64_t>(p.row_length), drop_threshold);
  }
}

void launch_keep_mask(const KeepMaskParams& p, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const int64_t blocks = (p.numel + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65536 ? blocks : 65536);
  FASTFORMER_LAUNCH(keep_mask_kernel, grid, kThreads, 0, stream)(p);
}

}  // namespace dropout
}  // namespace fastformer
