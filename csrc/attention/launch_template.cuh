// The bodies of run_attention_fwd / run_attention_bwd, included by the one instantiation file per
// (pass, head dim, dtype) under instantiations/ (so that the build compiles them in parallel).
//
// Each picks the kernel variant at run time: kGeneral (attn_mask and dropout compiled in) or not,
// and for the dK/dV kernel kMaskGrad (a float mask's gradient written too).
// The forward and dK/dV kernels mask only the tiles that need it: those crossing a key end (the
// forward's) or the causal diagonal, those of a batch row with padding holes, and with an
// attn_mask every tile; the dQ kernel also every tile of its general variant. Grids: row blocks
// on x (the fastest-varying, so CTAs reading the same K/V run together), then heads, then the
// batch, all on gridDim.x (flat_grid_ctas in launch.h, grid_place in device.cuh).
// The caller checks the launches (FASTFORMER_CHECK_LAUNCH in attention_ops.cpp), which also
// reports a refused shared-memory opt-in: the launch that needed it fails.
#pragma once

#include "attention/bwd_kernel.cuh"
#include "attention/fwd_kernel.cuh"
#include "attention/launch.h"
#include "attention/traits.h"
#include "common/kernel_runtime.cuh"

namespace fastformer {
namespace attention {

inline bool general_variant(const AttentionParams& p) { return p.mask_kind != kNoMask || p.has_dropout; }

template <int kHeadDim, typename T>
void run_attention_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Tr = AttentionTraits<kHeadDim, T>;
  auto kernel = general_variant(p) ? attention_fwd_kernel<Tr, true> : attention_fwd_kernel<Tr, false>;
  constexpr int smem = Tr::kFwdSmemBytes;
  allow_dynamic_shared_memory(kernel, smem);
  const dim3 grid(static_cast<unsigned>(flat_grid_ctas(p.len_q, Tr::kBlockM, p.heads_q, p.batch)));
  FASTFORMER_LAUNCH(kernel, grid, Tr::kThreads, smem, stream)(p);
}

template <int kHeadDim, typename T>
void run_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Tr = AttentionTraits<kHeadDim, T>;
  const bool general = general_variant(p);

  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  auto preprocess = attention_bwd_preprocess_kernel<T>;
  FASTFORMER_LAUNCH(preprocess, static_cast<unsigned>((rows + kPreprocessRowsPerCta - 1) / kPreprocessRowsPerCta),
                    32 * kPreprocessRowsPerCta, 0, stream)(p);

  // The mask gradient's own variant, so that the registers of the others do not pay for it.
  auto dkdv = p.grad_mask != nullptr ? attention_bwd_dkdv_kernel<Tr, true, true>
              : general              ? attention_bwd_dkdv_kernel<Tr, true>
                                     : attention_bwd_dkdv_kernel<Tr, false>;
  const bool atomic_dq = p.grad_q_sum != nullptr;  // then dK/dV also sums dQ, with dS^T in shared memory
  const int dkdv_smem = Tr::kBwdKvSmemBytes + (atomic_dq ? Tr::kBwdDsSmemBytes : 0);
  allow_dynamic_shared_memory(dkdv, Tr::kBwdKvSmemBytes + Tr::kBwdDsSmemBytes);
  const dim3 dkdv_grid(static_cast<unsigned>(flat_grid_ctas(p.len_k, Tr::kBwdKvBlockN, p.heads_k, p.batch)));
  FASTFORMER_LAUNCH(dkdv, dkdv_grid, Tr::kBwdKvThreads, dkdv_smem, stream)(p);
  if (atomic_dq) return;

  auto dq = general ? attention_bwd_dq_kernel<Tr, true> : attention_bwd_dq_kernel<Tr, false>;
  constexpr int dq_smem = Tr::kBwdQSmemBytes;
  allow_dynamic_shared_memory(dq, dq_smem);
  const dim3 dq_grid(static_cast<unsigned>(flat_grid_ctas(p.len_q, Tr::kBwdQBlockM, p.heads_q, p.batch)));
  FASTFORMER_LAUNCH(dq, dq_grid, Tr::kThreads, dq_smem, stream)(p);
}

}  // namespace attention
}  // namespace fastformer
