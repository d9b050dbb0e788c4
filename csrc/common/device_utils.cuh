// Small device helpers shared by the memory-bound kernels (norms, GELU, dropout masks):
// aligned vectors for 16-byte loads, float conversion of the storage types, warp and block sums.
//
// Kernel translation units include this file and no torch header, so that they compile quickly;
// the torch side (tensors, checks, streams) lives in the *_ops.cpp files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/kernel_runtime.cuh"

namespace fastformer {

// kN values of U, aligned so that one access is a single 16-byte load/store when sizeof(U) * kN
// is 16 (two when it is 32, e.g. 8 float32 weights next to 8 bf16 activations).
template <typename U, int kN>
struct alignas(sizeof(U) * kN >= 16 ? 16 : sizeof(U) * kN) Vec {
  U v[kN];
};

template <typename U>
__device__ __forceinline__ float to_float(U value) {
  return static_cast<float>(value);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half value) {
  return __half2float(value);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 value) {
  return __bfloat162float(value);
}

template <typename U>
__device__ __forceinline__ U from_float(float value) {
  return static_cast<U>(value);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float value) {
  return __float2half_rn(value);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);
}

// Loads kN consecutive values of U starting at p (aligned to the vector) as float32.
template <int kN, typename U>
__device__ __forceinline__ void load_as_float(const U* p, float (&out)[kN]) {
  FASTFORMER_CHECK_ALIGNED(p, alignof(Vec<U, kN>));
  const Vec<U, kN> packed = *reinterpret_cast<const Vec<U, kN>*>(p);
#pragma unroll
  for (int i = 0; i < kN; ++i) out[i] = to_float(packed.v[i]);
}

template <int kN, typename U>
__device__ __forceinline__ void store_from_float(U* p, const float (&in)[kN]) {
  Vec<U, kN> packed;
#pragma unroll
  for (int i = 0; i < kN; ++i) packed.v[i] = from_float<U>(in[i]);
  FASTFORMER_CHECK_ALIGNED(p, alignof(Vec<U, kN>));
  *reinterpret_cast<Vec<U, kN>*>(p) = packed;
}

// A per-column parameter (weight, bias) stored either in the activations' type T or in float32.
template <int kN, typename T>
__device__ __forceinline__ void load_param(const void* p, bool is_float32, int64_t index,
                                           float (&out)[kN]) {
  if (is_float32) {
    load_as_float<kN>(static_cast<const float*>(p) + index, out);
  } else {
    load_as_float<kN>(static_cast<const T*>(p) + index, out);
  }
}

// Sum of kValues floats over the 32 lanes of a warp; every lane gets the sums.
template <int kValues>
__device__ __forceinline__ void warp_sum(float (&values)[kValues]) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) values[i] += __shfl_xor_sync(0xffffffffu, values[i], mask);
  }
}

// Sum of kValues floats over the whole block (blockDim.x a multiple of 32, blockDim.y == 1);
// every thread gets the sums. `scratch` holds kValues * 32 floats in shared memory; the call
// ends with a barrier, so the scratch can be reused by the next call.
template <int kValues>
__device__ __forceinline__ void block_sum(float (&values)[kValues], float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  warp_sum(values);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < kValues; ++i) scratch[i * 32 + warp] = values[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kValues; ++i) values[i] = lane < warps ? scratch[i * 32 + lane] : 0.0f;
  warp_sum(values);  // every warp reduces the per-warp sums itself: no broadcast step
  __syncthreads();
}

}  // namespace fastformer
