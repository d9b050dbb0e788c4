// Bias + GELU: what the torch side (bias_gelu_ops.cpp) and the kernels (bias_gelu.cu) share.
//
// Forward:  h = x + bias;  y = dropout(gelu(h))   (exact erf, or the tanh approximation)
//           dropout(g) = keep ? g / (1 - p) : 0, keep = Philox::keep(seed, row, col, N, p)
// Backward: dh = (keep ? dy / (1 - p) : 0) * gelu'(h);  dx = dh;
//           d bias = sum over rows of dh (partial sums per row group)
// h is recomputed from x and bias, and keep from the seed, in the backward (no mask is stored).
// x, dy: (rows, N) with a row stride (0 allowed: a broadcast row) and contiguous columns; outputs
// are contiguous. p == 0: no dropout (kernels without it).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace fastformer {
namespace bias_gelu {

struct FwdParams {
  DType dtype;          // of x and out
  const void* x;        // (rows, N), row stride stride_x
  const void* bias;     // (N,), x's type or float32 (bias_float32); null: none
  bool bias_float32;
  void* out;            // (rows, N) contiguous
  int64_t rows, n, stride_x;
  bool tanh;            // approximate="tanh"
  float dropout_p;      // 0: no dropout
  const int64_t* seed;  // one int64 on the device, loaded by the kernel; null: no dropout
};

struct BwdParams {
  DType dtype;               // of grad_out, x, grad_x
  const void* grad_out;      // (rows, N), row stride stride_grad_out
  const void* x;             // (rows, N), row stride stride_x
  const void* bias;          // (N,), x's type or float32; null: none
  bool bias_float32;
  void* grad_x;              // (rows, N) contiguous
  float* partial_grad_bias;  // (row_groups, N) float32; null: no bias
  int64_t rows, n, stride_grad_out, stride_x;
  bool tanh;
  float dropout_p;           // as in FwdParams
  const int64_t* seed;
};

// A block is kThreads threads laid out (tx, ty): tx threads along the row's vectors, ty rows
// at a time. The grid is (column blocks, row groups); a row group is a run of consecutive rows.
constexpr int kThreads = 256;

struct LaunchShape {
  bool vectorized;  // 16-byte accesses (pointers and row strides aligned, N % vec == 0)
  int tx, ty;
  int64_t column_blocks, row_groups, rows_per_group;
};

template <typename T_, bool kVectorized_, bool kTanh_, bool kBias_, bool kDropout_>
struct Traits {
  using T = T_;
  static constexpr int kVec = kVectorized_ ? 16 / static_cast<int>(sizeof(T)) : 1;
  static constexpr bool kTanh = kTanh_;
  static constexpr bool kBias = kBias_;
  static constexpr bool kDropout = kDropout_;
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "storage types are float32, float16, bfloat16");
  static_assert(kVec * sizeof(T) == 16 || kVec == 1, "vectors are 16 bytes");
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size");
};

// The (tx, ty) layout and the grid for a (rows, N) problem; `groups_wanted` bounds the row groups
// (the backward with a bias writes one partial row per group).
inline LaunchShape launch_shape(int64_t rows, int64_t n, int element_size, bool aligned,
                                int64_t groups_wanted) {
  LaunchShape s;
  const int vec = 16 / element_size;
  s.vectorized = aligned && n % vec == 0;
  const int64_t vectors = s.vectorized ? n / vec : n;
  s.tx = 1;
  while (s.tx < 128 && s.tx < vectors) s.tx *= 2;
  s.ty = kThreads / s.tx;
  s.column_blocks = (vectors + s.tx - 1) / s.tx;
  const int64_t row_blocks = (rows + s.ty - 1) / s.ty;
  int64_t groups = groups_wanted / s.column_blocks;
  groups = groups < 1 ? 1 : groups > row_blocks ? row_blocks : groups;
  const int64_t blocks_per_group = (row_blocks + groups - 1) / groups;
  s.rows_per_group = blocks_per_group * s.ty;
  s.row_groups = (rows + s.rows_per_group - 1) / s.rows_per_group;
  return s;
}

void launch_fwd(const FwdParams& params, const LaunchShape& shape, cudaStream_t stream);
void launch_bwd(const BwdParams& params, const LaunchShape& shape, cudaStream_t stream);

}  // namespace bias_gelu
}  // namespace fastformer
