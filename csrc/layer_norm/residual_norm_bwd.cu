// Backward of the fused residual + dropout + LayerNorm / RMSNorm (math in residual_norm.h).
//
// Rows are spread over a fixed grid (params.partials blocks): a warp or a block walks its rows,
// keeps its columns' running sums of dy * xhat and dy in registers, and each block writes one
// partial row of d weight / d bias; the torch side sums the partial rows (no atomics, so the
// result is the same from run to run). xhat is recomputed from the stored r with the forward's
// two-step mean, so forward and backward normalise identically.
#include "common/device_utils.cuh"
#include "common/philox.cuh"
#include "common/static_switch.h"
#include "layer_norm/residual_norm.h"

namespace fastformer {
namespace residual_norm {

template <class K, int kValues>
__device__ __forceinline__ void row_sum(float (&values)[kValues], float* scratch) {
  if constexpr (K::kWarpPerRow) {
    warp_sum(values);
  } else {
    block_sum(values, scratch);
  }
}

// The weight at columns col .. col + kVec - 1 as float32 (1 without a weight or outside the row).
template <class K>
__device__ __forceinline__ void load_weight(const BwdParams& p, bool inside, int64_t col,
                                            float (&w)[K::kVec]) {
  if (inside && p.weight != nullptr) {
    load_param<K::kVec, typename K::T>(p.weight, p.weight_float32, col, w);
  } else {
#pragma unroll
    for (int i = 0; i < K::kVec; ++i) w[i] = 1.0f;
  }
}

// kMaxThreads: the most threads per block this instantiation is launched with. A block per row
// keeps four arrays of its values (r, dy and the two column sums) live across the row loop, about
// 64 floats a thread: under a 1024-thread bound (64 registers a thread) they spill, so rows of up
// to kSmallBlockThreads * 16 values (N <= 8192) get an instantiation bounded at 512 threads (128
// registers a thread); only wider rows take the 1024-thread one. That keeps the vectorised rows
// in registers; the scalar ones (N not a multiple of the vector width, or unaligned rows) and the
// 1024-thread ones still spill (ptxas -v; benchmarks/results/tuning-log.md).
template <class K, int kMaxThreads>
__global__ void __launch_bounds__(kMaxThreads) residual_norm_bwd_kernel(const BwdParams p) {
  using T = typename K::T;
  using X = typename K::X;
  constexpr int kVec = K::kVec;
  constexpr int kChunks = K::kChunks;
  __shared__ float scratch[3 * 32];
  float* warp_partials = reinterpret_cast<float*>(dynamic_shared_memory());  // warp per row: [sums][warp][N]

  const int warp = threadIdx.x >> 5;
  int64_t first_row, row_step;
  int lane, threads;
  if constexpr (K::kWarpPerRow) {
    first_row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
    row_step = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
    lane = threadIdx.x & 31;
    threads = 32;
  } else {
    first_row = blockIdx.x;
    row_step = gridDim.x;
    lane = threadIdx.x;
    threads = blockDim.x;
  }
  const int64_t n = p.n;
  const float inv_n = 1.0f / static_cast<float>(n);
  const float keep_divisor = 1.0f - p.dropout_p;
  const uint32_t drop_threshold = Philox::drop_threshold(p.dropout_p);
  const uint64_t seed = K::kDropout ? static_cast<uint64_t>(*p.seed) : 0;

  bool inside[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) inside[c] = (static_cast<int64_t>(c) * threads + lane) * kVec < n;
  // Registers hold the two column sums, r (then xhat) and dy of the current row; the weight is
  // re-read per row (from L1/L2) to spare registers (see kMaxThreads above).
  float grad_weight[kChunks][kVec], grad_bias[kChunks][kVec];
#pragma unroll
  for (int c = 0; c < kChunks; ++c)
#pragma unroll
    for (int i = 0; i < kVec; ++i) grad_weight[c][i] = grad_bias[c][i] = 0.0f;

  // Every thread of a block walks the same rows in block mode (the row sums have barriers).
  for (int64_t row = first_row; row < p.rows; row += row_step) {
    const T* normed = static_cast<const T*>(p.normed) + row * p.stride_normed;
    const T* grad_out = static_cast<const T*>(p.grad_out) + row * p.stride_grad_out;
    float r[kChunks][kVec], dy[kChunks][kVec];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
      if (inside[c]) {
        load_as_float<kVec>(normed + col, r[c]);
        load_as_float<kVec>(grad_out + col, dy[c]);
      } else {
#pragma unroll
        for (int i = 0; i < kVec; ++i) r[c][i] = dy[c][i] = 0.0f;
      }
    }
    const float rstd = p.rstd[row];

    // xhat (in place of r) and the two row means of the formula.
    float (&xhat)[kChunks][kVec] = r;
    float mean_g = 0.0f, mean_g_xhat;
    if constexpr (K::kRms) {
      float sums[1] = {0.0f};  // sum(g * r)
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float w[kVec];
        load_weight<K>(p, inside[c], (static_cast<int64_t>(c) * threads + lane) * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) sums[0] += dy[c][i] * w[i] * r[c][i];
      }
      row_sum<K>(sums, scratch);
      mean_g_xhat = sums[0] * rstd * inv_n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int i = 0; i < kVec; ++i) xhat[c][i] = r[c][i] * rstd;
    } else {
      float sums[1] = {0.0f};
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int i = 0; i < kVec; ++i) sums[0] += r[c][i];
      row_sum<K>(sums, scratch);
      const float mean0 = sums[0] * inv_n;
      // sum(d), sum(g), sum(g * d) with d = r - mean0 (zero outside the row).
      float moments[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float w[kVec];
        load_weight<K>(p, inside[c], (static_cast<int64_t>(c) * threads + lane) * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float d = inside[c] ? r[c][i] - mean0 : 0.0f;
          const float g = dy[c][i] * w[i];
          xhat[c][i] = d;
          moments[0] += d;
          moments[1] += g;
          moments[2] += g * d;
        }
      }
      row_sum<K>(moments, scratch);
      const float correction = moments[0] * inv_n;
      mean_g = moments[1] * inv_n;
      // sum(g * xhat) = rstd * (sum(g * d) - correction * sum(g))
      mean_g_xhat = rstd * (moments[2] - correction * moments[1]) * inv_n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c)
#pragma unroll
        for (int i = 0; i < kVec; ++i) xhat[c][i] = (xhat[c][i] - correction) * rstd;
    }

    const T* grad_residual_out = p.grad_residual_out == nullptr ? nullptr
        : static_cast<const T*>(p.grad_residual_out) + row * p.stride_grad_residual_out;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (!inside[c]) continue;
      const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
      float w[kVec];
      load_weight<K>(p, true, col, w);
      float dr[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float g = dy[c][i] * w[i];
        dr[i] = (g - mean_g - xhat[c][i] * mean_g_xhat) * rstd;
        grad_weight[c][i] += dy[c][i] * xhat[c][i];
        grad_bias[c][i] += dy[c][i];
      }
      if (grad_residual_out != nullptr) {
        float extra[kVec];
        load_as_float<kVec>(grad_residual_out + col, extra);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dr[i] += extra[i];
      }
      if (p.grad_residual != nullptr) {
        store_from_float<kVec>(static_cast<T*>(p.grad_residual) + row * n + col, dr);
      }
      if constexpr (K::kDropout) {
        bool keep[kVec];
        Philox::keep_run<kVec>(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(col),
                               static_cast<uint64_t>(n), drop_threshold, keep);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dr[i] = keep[i] ? dr[i] / keep_divisor : 0.0f;
      }
      store_from_float<kVec>(static_cast<X*>(p.grad_x) + row * n + col, dr);
    }
  }

  // One partial row of d weight / d bias per block.
  float* partials[2] = {p.partial_grad_weight, p.partial_grad_bias};
  if constexpr (K::kWarpPerRow) {
    // The block's warps hold the same columns: add them up through shared memory first.
    int sum_index = 0;
#pragma unroll
    for (int which = 0; which < 2; ++which) {
      if (partials[which] == nullptr) continue;
      float* mine = warp_partials + (static_cast<int64_t>(sum_index) * kWarpsPerBlock + warp) * n;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        if (!inside[c]) continue;
        const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
#pragma unroll
        for (int i = 0; i < kVec; ++i) mine[col + i] = which == 0 ? grad_weight[c][i] : grad_bias[c][i];
      }
      ++sum_index;
    }
    __syncthreads();
    sum_index = 0;
    for (int which = 0; which < 2; ++which) {
      if (partials[which] == nullptr) continue;
      const float* sums = warp_partials + static_cast<int64_t>(sum_index) * kWarpsPerBlock * n;
      for (int64_t col = threadIdx.x; col < n; col += blockDim.x) {
        float total = 0.0f;
#pragma unroll
        for (int w = 0; w < kWarpsPerBlock; ++w) total += sums[w * n + col];
        partials[which][static_cast<int64_t>(blockIdx.x) * n + col] = total;
      }
      ++sum_index;
    }
  } else {
    // Each thread writes its own columns (no array selected at run time: that would put the
    // sums in local memory).
    const int64_t offset = static_cast<int64_t>(blockIdx.x) * n;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (!inside[c]) continue;
      const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
      if (p.partial_grad_weight != nullptr) {
        store_from_float<kVec>(p.partial_grad_weight + offset + col, grad_weight[c]);
      }
      if (p.partial_grad_bias != nullptr) {
        store_from_float<kVec>(p.partial_grad_bias + offset + col, grad_bias[c]);
      }
    }
  }
}

// --------------------------------------------------------------------------------------------
// launch: the runtime switches become template arguments. Residual inputs and outputs of the
// backward are plain pointer checks (a store more or less), not instantiations.
// --------------------------------------------------------------------------------------------
constexpr int kSmallBlockThreads = 512;

template <typename T, typename X, bool kVectorized, bool kWarpPerRow, bool kRms, bool kDropout>
void launch(const BwdParams& p, const LaunchShape& shape, cudaStream_t stream) {
  using K = Traits<T, X, kVectorized, kWarpPerRow, kRms, kDropout, false>;
  const size_t shared = bwd_shared_bytes(p, shape);
  auto kernel = residual_norm_bwd_kernel<K, K::kLaunchBound>;
  if constexpr (!K::kWarpPerRow) {
    if (shape.threads <= kSmallBlockThreads) kernel = residual_norm_bwd_kernel<K, kSmallBlockThreads>;
  }
  FASTFORMER_LAUNCH(kernel, p.partials, shape.threads, shared, stream)(p);
}

void launch_bwd(const BwdParams& p, const LaunchShape& shape, cudaStream_t stream) {
  dispatch_types(p.dtype, p.x_dtype, [&](auto stream_type, auto x_type) {
    with_flags([&](auto vectorized, auto warp_per_row, auto rms, auto dropout) {
      launch<decltype(stream_type), decltype(x_type), vectorized, warp_per_row, rms, dropout>(p, shape, stream);
    }, shape.vectorized, shape.warp_per_row, p.rms, p.dropout_p > 0.0f);
  });
}

}  // namespace residual_norm
}  // namespace fastformer
