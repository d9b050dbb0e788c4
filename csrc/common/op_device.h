// The device side of the *_ops.cpp files: which tensors the kernels take, the device guard, the
// stream, the launch check, and the torch.library namespace and dispatch key the ops are
// registered under. The extension runs the kernels on CUDA tensors, in namespace `fastformer`.
//
// The tests' CPU emulator of the kernels (tests/cuda_emulator) compiles the same *_ops.cpp files
// with FASTFORMER_CPU_EMULATION and gets these names from cuda_emulator_ops.h instead: CPU
// tensors, kernels run by the emulator, ops in namespace `fastformer_emulated`.
#pragma once

#if defined(FASTFORMER_CPU_EMULATION)
#include "cuda_emulator_ops.h"
#else
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

// TORCH_LIBRARY_FRAGMENT(FASTFORMER_OPS_NAMESPACE, m) / TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE,
// FASTFORMER_KERNEL_DISPATCH_KEY, m): where the ops and their kernels are registered.
#define FASTFORMER_OPS_NAMESPACE fastformer
#define FASTFORMER_KERNEL_DISPATCH_KEY CUDA
// After the launches of an op: reports a failed launch (or a failed launch set-up) as an error.
#define FASTFORMER_CHECK_LAUNCH() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace fastformer {

using KernelDeviceGuard = c10::cuda::CUDAGuard;

// Whether the kernels can read t (a CUDA tensor).
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }

inline cudaStream_t kernel_stream() { return at::cuda::getCurrentCUDAStream(); }

inline int multiprocessor_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

}  // namespace fastformer
#endif
