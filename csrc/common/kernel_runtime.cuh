// What kernel code takes from the CUDA runtime beyond plain C++: the launch, the block's dynamic
// shared memory and the opt-in above 48 KiB of it; and the alignment its vector accesses assume.
//
// Compiled with FASTFORMER_CPU_EMULATION (the tests' emulator of the CUDA execution model,
// tests/cuda_emulator), the same names come from cuda_emulator.h instead, which runs the kernels
// on the CPU. Kernel code uses only these names for launches and dynamic shared memory, so that
// the emulator can run it unchanged.
#pragma once

#if defined(FASTFORMER_CPU_EMULATION)
#include "cuda_emulator.h"
#else
#include <cuda_runtime.h>

namespace fastformer {

// The block's dynamic shared memory (the third launch argument), 128-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(128) unsigned char fastformer_dynamic_shared_memory[];
  return fastformer_dynamic_shared_memory;
}

// Dynamic shared memory above 48 KiB must be allowed per kernel before its launch.
template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace fastformer

// A vector access (16-byte Vec, 4-byte pair) at `ptr` assumes `bytes` alignment: on a GPU a
// misaligned one fails the launch ("misaligned address"); on the CPU it would silently work, so
// the emulator checks it here. Nothing in a CUDA build.
#define FASTFORMER_CHECK_ALIGNED(ptr, bytes) ((void)0)

// FASTFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...) launches kernel<<<...>>>.
// `kernel` must be one token (a function name or a variable; a template-id with commas would be
// split by the preprocessor).
#define FASTFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  kernel<<<grid, block, shared_bytes, stream>>>
#endif
