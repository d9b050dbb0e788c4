// The key-range kernel: each batch row's key end and holes from its key_padding_mask bytes, on the
// device, in one launch before the attention kernels (which read them from the params: params.h).
//
// One CTA per batch row b reads the row's Lk bytes once, 4 a thread at a time where the row is
// 4-byte aligned (the usual (B, Lk) mask with Lk a multiple of 4), and reduces over the block
//   key_ends[b]          = max{j + 1 : padding_j == 0}   (0 if every key is padding)
//   key_padding_holes[b] = min{j : padding_j != 0} < key_ends[b]
// Kept out of the attention kernels on purpose: a scan in their prologue changes the register
// allocation of their main loops (ptxas), which only a GPU can tell the price of.
#include <cstdint>

#include "attention/launch.h"
#include "common/kernel_runtime.cuh"

namespace fastformer {
namespace attention {

constexpr int kKeyRangeThreads = 128;

__global__ void __launch_bounds__(kKeyRangeThreads) attention_key_range_kernel(const KeyRangeParams p) {
  constexpr int kWarps = kKeyRangeThreads / 32;
  __shared__ int warp_ends[kWarps], warp_first_padding[kWarps];
  const int b = blockIdx.x;
  const uint8_t* row = p.key_padding + b * p.key_padding_batch_stride;
  int end = 0, first_padding = p.len_k;  // this thread's keys
  auto visit = [&](int j, uint32_t byte) {
    if (byte != 0) {
      first_padding = min(first_padding, j);
    } else {
      end = max(end, j + 1);
    }
  };
  int j_bytes = 0;  // where the byte-wise loop starts
  if ((reinterpret_cast<uintptr_t>(row) & 3) == 0) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row);
    const int n_words = p.len_k / 4;
    for (int w = threadIdx.x; w < n_words; w += kKeyRangeThreads) {
      FASTFORMER_CHECK_ALIGNED(words + w, 4);
      const uint32_t word = words[w];
#pragma unroll
      for (int e = 0; e < 4; ++e) visit(4 * w + e, (word >> (8 * e)) & 0xffu);
    }
    j_bytes = 4 * n_words;
  }
  for (int j = j_bytes + static_cast<int>(threadIdx.x); j < p.len_k; j += kKeyRangeThreads) visit(j, row[j]);

#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
    end = max(end, __shfl_xor_sync(0xffffffffu, end, mask));
    first_padding = min(first_padding, __shfl_xor_sync(0xffffffffu, first_padding, mask));
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    warp_ends[warp] = end;
    warp_first_padding[warp] = first_padding;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      end = max(end, warp_ends[w]);
      first_padding = min(first_padding, warp_first_padding[w]);
    }
    p.key_ends[b] = end;
    p.key_padding_holes[b] = first_padding < end ? 1 : 0;
  }
}

void launch_attention_key_range(const KeyRangeParams& params, cudaStream_t stream) {
  FASTFORMER_LAUNCH(attention_key_range_kernel, static_cast<unsigned>(params.batch), kKeyRangeThreads, 0,
                    stream)(params);
}

}  // namespace attention
}  // namespace fastformer
