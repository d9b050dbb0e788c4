// The bodies of run_attention_fwd / run_attention_bwd, included by the one instantiation file per
// (pass, head dim, dtype) under instantiations/ (so that the build compiles them in parallel).
//
// Each picks the kernel variant at run time: kGeneral (an attn_mask or dropout) or not (only key
// lengths and the causal diagonal, masked on the tiles that need it). Grids: row blocks on x (the
// fastest-varying, so CTAs reading the same K/V run together), heads on y, batch on z.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime_api.h>

#include "attention/bwd_kernel.cuh"
#include "attention/fwd_kernel.cuh"
#include "attention/launch.h"
#include "attention/traits.h"

namespace fastformer {
namespace attention {

template <typename Kernel>
void set_smem(Kernel kernel, int bytes) {
  if (bytes > 48 * 1024) {  // above 48 KiB dynamic shared memory is opt-in
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

inline bool general_variant(const AttentionParams& p) { return p.mask_kind != kNoMask || p.has_dropout; }

template <int kHeadDim, typename T>
void run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttentionTraits<kHeadDim, T>;
  auto kernel = general_variant(p) ? attention_fwd_kernel<Tr, true> : attention_fwd_kernel<Tr, false>;
  constexpr int smem = Tr::kFwdSmemBytes;
  set_smem(kernel, smem);
  const dim3 grid((p.len_q + Tr::kBlockM - 1) / Tr::kBlockM, p.heads_q, p.batch);
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int kHeadDim, typename T>
void run_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Tr = AttentionTraits<kHeadDim, T>;
  const bool general = general_variant(p);

  constexpr int kRowsPerBlock = 256 / 32;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  attention_bwd_preprocess_kernel<T>
      <<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), 256, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dkdv = general ? attention_bwd_dkdv_kernel<Tr, true> : attention_bwd_dkdv_kernel<Tr, false>;
  constexpr int dkdv_smem = Tr::kBwdKvSmemBytes;
  set_smem(dkdv, dkdv_smem);
  const dim3 dkdv_grid((p.len_k + Tr::kBwdKvBlockN - 1) / Tr::kBwdKvBlockN, p.heads_k, p.batch);
  dkdv<<<dkdv_grid, Tr::kThreads, dkdv_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dq = general ? attention_bwd_dq_kernel<Tr, true> : attention_bwd_dq_kernel<Tr, false>;
  constexpr int dq_smem = Tr::kBwdQSmemBytes;
  set_smem(dq, dq_smem);
  const dim3 dq_grid((p.len_q + Tr::kBwdQBlockM - 1) / Tr::kBwdQBlockM, p.heads_q, p.batch);
  dq<<<dq_grid, Tr::kThreads, dq_smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace attention
}  // namespace fastformer
