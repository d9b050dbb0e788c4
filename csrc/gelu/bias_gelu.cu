// Bias + GELU (+ dropout) kernels, forward and backward (math in bias_gelu.h; float32 inside,
// rounded once).
//
//   erf:  gelu(h) = h Phi(h) = 0.5 h (1 + erf(h / sqrt(2))),  gelu'(h) = Phi(h) + h phi(h)
//   tanh: gelu(h) = 0.5 h (1 + tanh(u)),  u = sqrt(2/pi) (h + 0.044715 h^3)
//         gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2),  t = tanh(u)
//   with 0.5 (1 + t) = sigmoid(2u) and 1 - t^2 = 4 sigmoid(2u) (1 - sigmoid(2u)), as the Triton
//   kernels (fastformer/triton/bias_gelu.py): no inf / inf for large |h|.
//   dropout: y = keep ? gelu(h) / (1 - p) : 0,  dh = (keep ? dy / (1 - p) : 0) gelu'(h), keep from
//   Philox (common/philox.cuh) at (row, col) of the (rows, N) view, drawn again in the backward.
//
// Thread (tx, ty) of a block owns one vector of columns and walks the rows ty, ty + blockDim.y,
// ... of its row group: it loads its slice of bias once and, in the backward, keeps the column
// sums of dh in registers; the block adds its ty partial sums in shared memory and writes one
// partial row per row group, which the torch side sums (no atomics: deterministic).
#include "common/device_utils.cuh"
#include "common/philox.cuh"
#include "common/static_switch.h"
#include "gelu/bias_gelu.h"

namespace fastformer {
namespace bias_gelu {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

template <bool kTanh>
__device__ __forceinline__ float gelu(float h) {
  if constexpr (kTanh) {
    const float u = kSqrt2OverPi * (h + 0.044715f * h * h * h);
    return h * sigmoid(2.0f * u);
  } else {
    return 0.5f * h * (1.0f + erff(h * kInvSqrt2));
  }
}

template <bool kTanh>
__device__ __forceinline__ float gelu_grad(float h) {
  if constexpr (kTanh) {
    const float u = kSqrt2OverPi * (h + 0.044715f * h * h * h);
    const float s = sigmoid(2.0f * u);
    // s (1 - s) is exactly 0 in float32 once |h| > 20: clamping keeps 0 * inf out of the sum.
    const float hc = fminf(fmaxf(h, -20.0f), 20.0f);
    return s + 2.0f * hc * s * (1.0f - s) * kSqrt2OverPi * (1.0f + 0.134145f * hc * hc);
  } else {
    const float cdf = 0.5f * (1.0f + erff(h * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * expf(-0.5f * h * h);
    return cdf + h * pdf;
  }
}

// The rows [first, last) of this block's row group, and this thread's column (or -1).
struct Tile {
  int64_t first, last, col;
};

template <class K>
__device__ __forceinline__ Tile tile(int64_t rows, int64_t n, int64_t rows_per_group) {
  Tile t;
  t.first = static_cast<int64_t>(blockIdx.y) * rows_per_group;
  t.last = t.first + rows_per_group < rows ? t.first + rows_per_group : rows;
  t.col = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * K::kVec;
  if (t.col >= n) t.col = -1;
  return t;
}

template <class K>
__global__ void __launch_bounds__(kThreads) bias_gelu_fwd_kernel(const FwdParams p,
                                                                  int64_t rows_per_group) {
  using T = typename K::T;
  constexpr int kVec = K::kVec;
  const Tile t = tile<K>(p.rows, p.n, rows_per_group);
  if (t.col < 0) return;  // no barrier in the forward
  const float keep_divisor = 1.0f - p.dropout_p;  // as the Triton kernels: g / (1 - p)
  const uint32_t drop_threshold = Philox::drop_threshold(p.dropout_p);
  const uint64_t seed = K::kDropout ? static_cast<uint64_t>(*p.seed) : 0;
  float bias[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) bias[i] = 0.0f;
  if constexpr (K::kBias) load_param<kVec, T>(p.bias, p.bias_float32, t.col, bias);
#pragma unroll 4
  for (int64_t row = t.first + threadIdx.y; row < t.last; row += blockDim.y) {
    float h[kVec];
    load_as_float<kVec>(static_cast<const T*>(p.x) + row * p.stride_x + t.col, h);
#pragma unroll
    for (int i = 0; i < kVec; ++i) h[i] = gelu<K::kTanh>(h[i] + bias[i]);
    if constexpr (K::kDropout) {
      bool keep[kVec];
      Philox::keep_run<kVec>(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(t.col),
                             static_cast<uint64_t>(p.n), drop_threshold, keep);
#pragma unroll
      for (int i = 0; i < kVec; ++i) h[i] = keep[i] ? h[i] / keep_divisor : 0.0f;
    }
    store_from_float<kVec>(static_cast<T*>(p.out) + row * p.n + t.col, h);
  }
}

template <class K>
__global__ void __launch_bounds__(kThreads) bias_gelu_bwd_kernel(const BwdParams p,
                                                                  int64_t rows_per_group) {
  using T = typename K::T;
  constexpr int kVec = K::kVec;
  __shared__ float sums[K::kBias ? kThreads * kVec : 1];  // [ty][tx * kVec]
  const Tile t = tile<K>(p.rows, p.n, rows_per_group);
  const float keep_divisor = 1.0f - p.dropout_p;
  const uint32_t drop_threshold = Philox::drop_threshold(p.dropout_p);
  const uint64_t seed = K::kDropout ? static_cast<uint64_t>(*p.seed) : 0;
  float bias[kVec], grad_bias[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) bias[i] = grad_bias[i] = 0.0f;
  if (t.col >= 0) {
    if constexpr (K::kBias) load_param<kVec, T>(p.bias, p.bias_float32, t.col, bias);
#pragma unroll 4
    for (int64_t row = t.first + threadIdx.y; row < t.last; row += blockDim.y) {
      float h[kVec], dy[kVec];
      load_as_float<kVec>(static_cast<const T*>(p.x) + row * p.stride_x + t.col, h);
      load_as_float<kVec>(static_cast<const T*>(p.grad_out) + row * p.stride_grad_out + t.col, dy);
      if constexpr (K::kDropout) {  // the forward's mask, drawn again from the seed
        bool keep[kVec];
        Philox::keep_run<kVec>(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(t.col),
                               static_cast<uint64_t>(p.n), drop_threshold, keep);
#pragma unroll
        for (int i = 0; i < kVec; ++i) dy[i] = keep[i] ? dy[i] / keep_divisor : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        dy[i] *= gelu_grad<K::kTanh>(h[i] + bias[i]);
        grad_bias[i] += dy[i];
      }
      store_from_float<kVec>(static_cast<T*>(p.grad_x) + row * p.n + t.col, dy);
    }
  }
  if constexpr (K::kBias) {
    const int width = blockDim.x * kVec;
#pragma unroll
    for (int i = 0; i < kVec; ++i) sums[threadIdx.y * width + threadIdx.x * kVec + i] = grad_bias[i];
    __syncthreads();
    // The block's threads take the tile's columns in turn and add them over the ty rows.
    for (int k = threadIdx.y * blockDim.x + threadIdx.x; k < width; k += kThreads) {
      const int64_t col = static_cast<int64_t>(blockIdx.x) * width + k;
      if (col >= p.n) break;
      float total = 0.0f;
      for (int y = 0; y < static_cast<int>(blockDim.y); ++y) total += sums[y * width + k];
      p.partial_grad_bias[static_cast<int64_t>(blockIdx.y) * p.n + col] = total;
    }
  }
}

// --------------------------------------------------------------------------------------------
// launch: the runtime switches become template arguments
// --------------------------------------------------------------------------------------------
template <class K>
struct Fwd {
  static void run(const FwdParams& p, dim3 grid, dim3 block, int64_t rows_per_group,
                  cudaStream_t stream) {
    auto kernel = bias_gelu_fwd_kernel<K>;
    FASTFORMER_LAUNCH(kernel, grid, block, 0, stream)(p, rows_per_group);
  }
};

template <class K>
struct Bwd {
  static void run(const BwdParams& p, dim3 grid, dim3 block, int64_t rows_per_group,
                  cudaStream_t stream) {
    auto kernel = bias_gelu_bwd_kernel<K>;
    FASTFORMER_LAUNCH(kernel, grid, block, 0, stream)(p, rows_per_group);
  }
};

// Without dropout (p == 0) the kernels are the ones without any of its code.
template <template <class> class Kernel, typename Params>
void launch_any(const Params& p, const LaunchShape& s, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(s.column_blocks), static_cast<unsigned>(s.row_groups));
  const dim3 block(s.tx, s.ty);
  auto launch = [&](auto type) {
    with_flags([&](auto vectorized, auto tanh, auto bias, auto dropout) {
      Kernel<Traits<decltype(type), vectorized, tanh, bias, dropout>>::run(p, grid, block, s.rows_per_group,
                                                                            stream);
    }, s.vectorized, p.tanh, p.bias != nullptr, p.dropout_p > 0.0f);
  };
  switch (p.dtype) {
    case DType::kFloat32: launch(float{}); break;
    case DType::kFloat16: launch(__half{}); break;
    case DType::kBFloat16: launch(__nv_bfloat16{}); break;
  }
}

void launch_fwd(const FwdParams& p, const LaunchShape& s, cudaStream_t stream) {
  launch_any<Fwd>(p, s, stream);
}

void launch_bwd(const BwdParams& p, const LaunchShape& s, cudaStream_t stream) {
  launch_any<Bwd>(p, s, stream);
}

}  // namespace bias_gelu
}  // namespace fastformer
