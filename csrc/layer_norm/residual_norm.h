// Fused residual + dropout + LayerNorm / RMSNorm: what the torch side (residual_norm_ops.cpp)
// and the kernels (residual_norm_fwd.cu, residual_norm_bwd.cu) share.
//
// Forward, per row of N values (x and residual are (rows, N) with a row stride, columns
// contiguous; outputs are contiguous):
//   r = dropout(x) + residual            dropout(x) = keep ? x / (1 - p) : 0, keep from Philox
//   residual_out = r rounded to the stream type (and r is that rounded value from here on)
//   LayerNorm: y = (r - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var(r) + eps)
//   RMSNorm:   y = r * rstd * weight,                   rstd = 1 / sqrt(mean(r^2) + eps)
// Backward, with xhat recomputed from r and rstd and g = dy * weight:
//   LayerNorm: dr = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm:   dr = rstd * (g - xhat * mean(g * xhat))
//   dr += d residual_out;  d residual = dr;  dx = keep ? dr / (1 - p) : 0
//   d weight = sum over rows of dy * xhat,  d bias = sum over rows of dy  (partial sums per block)
//
// Types: the stream type T (residual, out, residual_out; the backward's inputs and grad_residual)
// is the type of x + residual. x, and so grad_x, may be narrower: a float16 / bfloat16 sublayer
// output meeting a float32 residual stream under autocast is read and written as it is, with no
// cast kernel on either side (mixed_types_supported below). Everything is computed in float32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"

namespace fastformer {
namespace residual_norm {

// The widest row a kernel keeps in registers (1024 threads x 16 values).
constexpr int kMaxHidden = 16384;

struct FwdParams {
  DType dtype;                    // the stream type: of residual, out, residual_out
  DType x_dtype;                  // of x: dtype, or float16 / bfloat16 when dtype is float32
  const void* x;                  // (rows, N), row stride stride_x
  const void* residual;           // (rows, N), row stride stride_residual; null: none
  const void* weight;             // (N,), the stream type or float32 (weight_float32); null: none
  const void* bias;               // (N,), as weight (bias_float32); null: none
  bool weight_float32, bias_float32;
  void* out;                      // (rows, N) contiguous
  void* residual_out;             // (rows, N) contiguous; null: not stored
  float* mean;                    // (rows,); null in RMS mode
  float* rstd;                    // (rows,)
  int64_t rows, n, stride_x, stride_residual;
  float eps, dropout_p;           // dropout_p == 0: no dropout
  const int64_t* seed;            // one int64 on the device, loaded by the kernel; null: no dropout
  bool rms;
};

struct BwdParams {
  DType dtype;                    // of grad_out, grad_residual_out, normed, grad_residual
  DType x_dtype;                  // of grad_x: the forward's x_dtype
  const void* grad_out;           // (rows, N), row stride stride_grad_out
  const void* grad_residual_out;  // (rows, N), row stride stride_grad_residual_out; null: none
  const void* normed;             // what the forward normalised (residual_out or x), stride_normed
  const void* weight;             // (N,), the stream type or float32; null: none
  bool weight_float32;
  const float* rstd;              // (rows,) from the forward
  void* grad_x;                   // (rows, N) contiguous, in x_dtype
  void* grad_residual;            // (rows, N) contiguous; null: the forward had no residual
  float* partial_grad_weight;     // (partials, N) float32; null: no weight
  float* partial_grad_bias;       // (partials, N) float32; null: no bias
  int64_t rows, n, stride_grad_out, stride_grad_residual_out, stride_normed;
  int partials;                   // rows of the partial sums = blocks of the launch
  float dropout_p;
  const int64_t* seed;            // as in FwdParams
  bool rms;
};

// The (x, stream) type pairs the kernels take: one type, or a 16-bit x with a float32 stream.
constexpr bool mixed_types_supported(DType x_dtype, DType dtype) {
  return x_dtype == dtype || dtype == DType::kFloat32;
}

// Calls f(T{}, X{}) with the stream and x types of a pair that mixed_types_supported accepts
// (the ops check the pair before they launch).
template <typename F>
void dispatch_types(DType dtype, DType x_dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: f(__half{}, __half{}); return;
    case DType::kBFloat16: f(__nv_bfloat16{}, __nv_bfloat16{}); return;
    case DType::kFloat32:
      switch (x_dtype) {
        case DType::kFloat32: f(float{}, float{}); return;
        case DType::kFloat16: f(float{}, __half{}); return;
        case DType::kBFloat16: f(float{}, __nv_bfloat16{}); return;
      }
  }
}

// How a launch maps rows to threads, chosen on the host from N, the dtype and the alignment.
struct LaunchShape {
  bool vectorized;     // 16-byte accesses (every pointer and row stride aligned, N % vec == 0)
  bool warp_per_row;   // one warp per row, kWarpsPerBlock rows per block; else a block per row
  int threads;         // threads per block
};

constexpr int kWarpsPerBlock = 4;

// Compile-time description of one kernel instantiation.
template <typename T_, typename X_, bool kVectorized_, bool kWarpPerRow_, bool kRms_, bool kDropout_,
          bool kResidual_>
struct Traits {
  using T = T_;  // the stream type
  using X = X_;  // x's and grad_x's
  // Values per access: 16 bytes of T (8 of a narrower X), or one value when the data is not
  // aligned for vectors.
  static constexpr int kVec = kVectorized_ ? 16 / static_cast<int>(sizeof(T)) : 1;
  // Accesses per thread per row: the row lives in kChunks * kVec registers of each thread.
  // A warp holds 4 vectors (or 16 values) a thread; a block 16 values a thread, so that its up
  // to 1024 threads keep within 64 registers in the forward (the backward, which also holds two
  // column sums, bounds rows up to 8192 values at 512 threads: see residual_norm_bwd.cu).
  static constexpr int kChunks = kWarpPerRow_ ? (kVectorized_ ? 4 : 16) : 16 / kVec;
  static constexpr bool kWarpPerRow = kWarpPerRow_;
  static constexpr bool kRms = kRms_;
  static constexpr bool kDropout = kDropout_;
  static constexpr bool kResidual = kResidual_;  // forward: a residual input; backward: its grad
  static constexpr int kMaxBlockThreads = 1024;
  // Threads per block this instantiation is launched with at most (its __launch_bounds__).
  static constexpr int kLaunchBound = kWarpPerRow_ ? 32 * kWarpsPerBlock : kMaxBlockThreads;
  static constexpr int kWarpCapacity = 32 * kChunks * kVec;
  static constexpr int kBlockCapacity = kMaxBlockThreads * kChunks * kVec;

  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "storage types are float32, float16, bfloat16");
  static_assert(std::is_same_v<X, T> || (sizeof(T) == 4 && sizeof(X) == 2),
                "x has the stream type, or is 16-bit with a float32 stream");
  static_assert(kVec * sizeof(T) == 16 || kVec == 1, "vectors are 16 bytes");
  static_assert(kBlockCapacity >= kMaxHidden, "a block must hold the widest row");
  static_assert(kChunks * kVec <= 64, "values per thread bounded to keep registers in check");
  // launch_shape() below assumes these values per thread.
  static_assert(kWarpPerRow || kChunks * kVec == 16, "a block holds 16 values a thread");
  static_assert(!kWarpPerRow || kChunks * kVec == (kVectorized_ ? 4 * kVec : 16),
                "a warp holds 4 vectors or 16 values a thread");
};

// Chooses vectorisation, warp or block per row, and threads; pure host logic. element_size is
// the stream type's: the vector width follows it, and a narrower x reads half vectors.
inline LaunchShape launch_shape(int64_t n, int element_size, bool aligned) {
  LaunchShape shape;
  const int vec = 16 / element_size;
  shape.vectorized = aligned && n % vec == 0;
  // kChunks * kVec of the warp and block instantiations (Traits)
  const int per_warp_thread = shape.vectorized ? 4 * vec : 16;
  const int per_block_thread = 16;
  shape.warp_per_row = n <= 32 * per_warp_thread;
  if (shape.warp_per_row) {
    shape.threads = 32 * kWarpsPerBlock;
  } else {
    const int64_t needed = (n + per_block_thread - 1) / per_block_thread;
    shape.threads = static_cast<int>(((needed + 31) / 32) * 32);
  }
  return shape;
}

// Launch on `stream`; the caller checks the launch (FASTFORMER_CHECK_LAUNCH).
void launch_fwd(const FwdParams& params, const LaunchShape& shape, cudaStream_t stream);
void launch_bwd(const BwdParams& params, const LaunchShape& shape, cudaStream_t stream);

// Shared memory the backward needs (warp per row: the block's per-warp column partial sums).
inline size_t bwd_shared_bytes(const BwdParams& params, const LaunchShape& shape) {
  if (!shape.warp_per_row) return 0;
  const int sums = (params.partial_grad_weight ? 1 : 0) + (params.partial_grad_bias ? 1 : 0);
  return static_cast<size_t>(sums) * kWarpsPerBlock * params.n * sizeof(float);
}

}  // namespace residual_norm
}  // namespace fastformer
