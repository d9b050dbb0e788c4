// Forward of the fused residual + dropout + LayerNorm / RMSNorm (math in residual_norm.h).
//
// A row lives in registers: thread `lane` of the row's threads (a warp, or the whole block)
// holds accesses c = 0 .. kChunks-1 at columns ((c * threads + lane) * kVec ...), so every
// input is read once and every output written once. Statistics are float32. LayerNorm takes
// the mean in two steps, mean0 = sum(r) / N, then the correction sum(r - mean0) / N together with
// sum((r - mean0)^2): r - mean0 is exact for values near the mean, so a row with mean 1e3 and
// spread 1e-2 keeps its digits (a one-pass E[r^2] - E[r]^2 would lose all of them).
#include "common/device_utils.cuh"
#include "common/philox.cuh"
#include "common/static_switch.h"
#include "layer_norm/residual_norm.h"

namespace fastformer {
namespace residual_norm {

// Sum over the threads of one row: the warp, or the block.
template <class K, int kValues>
__device__ __forceinline__ void row_sum(float (&values)[kValues], float* scratch) {
  if constexpr (K::kWarpPerRow) {
    warp_sum(values);
  } else {
    block_sum(values, scratch);
  }
}

template <class K>
__global__ void __launch_bounds__(K::kLaunchBound) residual_norm_fwd_kernel(const FwdParams p) {
  using T = typename K::T;
  using X = typename K::X;
  constexpr int kVec = K::kVec;
  constexpr int kChunks = K::kChunks;
  __shared__ float scratch[2 * 32];

  int64_t row;
  int lane, threads;
  if constexpr (K::kWarpPerRow) {
    row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    lane = threadIdx.x & 31;
    threads = 32;
    if (row >= p.rows) return;  // the whole warp leaves; warp mode has no block barrier
  } else {
    row = blockIdx.x;
    lane = threadIdx.x;
    threads = blockDim.x;
  }
  const int64_t n = p.n;
  const X* x = static_cast<const X*>(p.x) + row * p.stride_x;
  const T* residual = K::kResidual ? static_cast<const T*>(p.residual) + row * p.stride_residual
                                   : nullptr;
  const float keep_divisor = 1.0f - p.dropout_p;  // as the Triton kernels: r / (1 - p)
  const uint32_t drop_threshold = Philox::drop_threshold(p.dropout_p);
  const uint64_t seed = K::kDropout ? static_cast<uint64_t>(*p.seed) : 0;

  // r = dropout(x) + residual in float32, rounded to T when residual_out is stored.
  float r[kChunks][kVec];
  bool inside[kChunks];
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
    inside[c] = col < n;
    if (!inside[c]) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) r[c][i] = 0.0f;
      continue;
    }
    load_as_float<kVec>(x + col, r[c]);
    if constexpr (K::kDropout) {
      bool keep[kVec];
      Philox::keep_run<kVec>(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(col),
                             static_cast<uint64_t>(n), drop_threshold, keep);
#pragma unroll
      for (int i = 0; i < kVec; ++i) r[c][i] = keep[i] ? r[c][i] / keep_divisor : 0.0f;
    }
    if constexpr (K::kResidual) {
      float res[kVec];
      load_as_float<kVec>(residual + col, res);
#pragma unroll
      for (int i = 0; i < kVec; ++i) r[c][i] += res[i];
    }
    if (p.residual_out != nullptr) {
      T* residual_out = static_cast<T*>(p.residual_out) + row * n + col;
      Vec<T, kVec> rounded;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        rounded.v[i] = from_float<T>(r[c][i]);
        r[c][i] = to_float(rounded.v[i]);  // normalise exactly what is stored, as the backward will
      }
      FASTFORMER_CHECK_ALIGNED(residual_out, alignof(Vec<T, kVec>));
      *reinterpret_cast<Vec<T, kVec>*>(residual_out) = rounded;
    }
  }

  // Statistics.
  const float inv_n = 1.0f / static_cast<float>(n);
  float rstd, mean0 = 0.0f, correction = 0.0f;
  if constexpr (K::kRms) {
    float sums[1] = {0.0f};
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int i = 0; i < kVec; ++i) sums[0] += r[c][i] * r[c][i];
    row_sum<K>(sums, scratch);
    rstd = 1.0f / sqrtf(sums[0] * inv_n + p.eps);  // as Triton: 1 / sqrt(...)
  } else {
    float sums[1] = {0.0f};
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int i = 0; i < kVec; ++i) sums[0] += r[c][i];
    row_sum<K>(sums, scratch);
    mean0 = sums[0] * inv_n;
    float moments[2] = {0.0f, 0.0f};  // sum(r - mean0), sum((r - mean0)^2)
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      if (!inside[c]) continue;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float d = r[c][i] - mean0;
        moments[0] += d;
        moments[1] += d * d;
      }
    }
    row_sum<K>(moments, scratch);
    correction = moments[0] * inv_n;
    const float var = fmaxf(moments[1] * inv_n - correction * correction, 0.0f);
    rstd = 1.0f / sqrtf(var + p.eps);
  }
  if (lane == 0) {
    p.rstd[row] = rstd;
    if constexpr (!K::kRms) p.mean[row] = mean0 + correction;
  }

  // y = xhat * weight + bias.
  T* out = static_cast<T*>(p.out) + row * n;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    if (!inside[c]) continue;
    const int64_t col = (static_cast<int64_t>(c) * threads + lane) * kVec;
    float y[kVec];
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      y[i] = K::kRms ? r[c][i] * rstd : ((r[c][i] - mean0) - correction) * rstd;
    }
    if (p.weight != nullptr) {
      float w[kVec];
      load_param<kVec, T>(p.weight, p.weight_float32, col, w);
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] *= w[i];
    }
    if (p.bias != nullptr) {
      float b[kVec];
      load_param<kVec, T>(p.bias, p.bias_float32, col, b);
#pragma unroll
      for (int i = 0; i < kVec; ++i) y[i] += b[i];
    }
    store_from_float<kVec>(out + col, y);
  }
}

// --------------------------------------------------------------------------------------------
// launch: the runtime switches become template arguments
// --------------------------------------------------------------------------------------------
template <typename T, typename X, bool kVectorized, bool kWarpPerRow, bool kRms, bool kDropout,
          bool kResidual>
void launch(const FwdParams& p, const LaunchShape& shape, cudaStream_t stream) {
  using K = Traits<T, X, kVectorized, kWarpPerRow, kRms, kDropout, kResidual>;
  const int64_t blocks = kWarpPerRow ? (p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock : p.rows;
  auto kernel = residual_norm_fwd_kernel<K>;
  FASTFORMER_LAUNCH(kernel, static_cast<unsigned>(blocks), shape.threads, 0, stream)(p);
}

void launch_fwd(const FwdParams& p, const LaunchShape& shape, cudaStream_t stream) {
  dispatch_types(p.dtype, p.x_dtype, [&](auto stream_type, auto x_type) {
    using T = decltype(stream_type);
    using X = decltype(x_type);
    // A narrower x comes with a residual (the stream type is x + residual's): no instantiation
    // without one.
    const bool has_residual = !std::is_same_v<T, X> || p.residual != nullptr;
    with_flags([&](auto vectorized, auto warp_per_row, auto rms, auto dropout, auto residual) {
      if constexpr (std::is_same_v<T, X> || residual) {
        launch<T, X, vectorized, warp_per_row, rms, dropout, residual>(p, shape, stream);
      }
    }, shape.vectorized, shape.warp_per_row, p.rms, p.dropout_p > 0.0f, has_residual);
  });
}

}  // namespace residual_norm
}  // namespace fastformer
