// Host entry points of the attention kernels, called by the torch side (attention_ops.cpp).
// Plain types only: this header is included by host-compiled C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/params.h"

namespace fastformer {
namespace attention {

// The head dims the kernels are compiled for; a call uses the smallest one >= max(D, Dv) and
// predicates the rest (zeros loaded past D / Dv, nothing written there).
constexpr int kHeadDims[] = {32, 64, 96, 128};
constexpr int kMaxHeadDim = 128;

// Rows (queries, or keys for dK/dV) per CTA: 64 in the dK/dV and dQ kernels, 64 or 128 in the
// forward (traits.h). The grid-size check of attention_ops.cpp counts with the smallest.
constexpr int kMinRowsPerCta = 64;

// Rows of (B, Hq, Lq) per CTA of the backward's preprocess (delta): one warp each.
constexpr int kPreprocessRowsPerCta = 8;

// The CTAs of a (row block, head, batch) launch, all on gridDim.x (grid_place in device.cuh
// decodes them): gridDim.y and gridDim.z stop at 65535, which a batch of 65536 short sequences
// passes; x holds 2^31 - 1 CTAs, which attention_ops.cpp checks.
inline int64_t flat_grid_ctas(int64_t rows, int rows_per_cta, int64_t heads, int64_t batch) {
  return (rows + rows_per_cta - 1) / rows_per_cta * heads * batch;
}

// Smallest compiled head dim >= dim, or 0 when dim > kMaxHeadDim.
inline int padded_head_dim(int dim) {
  for (int hd : kHeadDims) {
    if (dim <= hd) return hd;
  }
  return 0;
}

// Launch on `stream`; the caller has set the device. bf16: bfloat16 inputs, otherwise float16.
void launch_attention_fwd(const AttentionParams& params, int head_dim, bool bf16, cudaStream_t stream);
// delta (preprocess), then dK/dV, then dQ.
void launch_attention_bwd(const AttentionBwdParams& params, int head_dim, bool bf16, cudaStream_t stream);

// Each batch row's key end and holes from its key padding bytes (key_range.cu): one CTA per row.
void launch_attention_key_range(const KeyRangeParams& params, cudaStream_t stream);

// One explicit instantiation per (head dim, dtype), in instantiations/*.cu.
template <int kHeadDim, typename T>
void run_attention_fwd(const AttentionParams& params, cudaStream_t stream);
template <int kHeadDim, typename T>
void run_attention_bwd(const AttentionBwdParams& params, cudaStream_t stream);

}  // namespace attention
}  // namespace fastformer
