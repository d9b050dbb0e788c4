// The device side of csrc's *_ops.cpp files (csrc/common/op_device.h) for the CPU emulator: the
// kernels take CPU tensors and run in the emulator (cuda_emulator.h), and the ops are registered
// in namespace `fastformer_emulated` for the CPU dispatch key, next to (never replacing) the
// extension's `fastformer` ops.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#define FASTFORMER_OPS_NAMESPACE fastformer_emulated
#define FASTFORMER_KERNEL_DISPATCH_KEY CPU
#define FASTFORMER_CHECK_LAUNCH() ((void)0)  // the emulator throws on a failed launch

namespace fastformer {

// Nothing to select: the emulator runs on the calling thread.
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const at::Device&) {}
};

inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }

inline cudaStream_t kernel_stream() { return nullptr; }

// Few, so that the grids sized by it (the norm backward's partial sums, GELU's row groups) have
// several blocks on small test inputs, as they do on a GPU with real sizes.
inline int multiprocessor_count() { return 3; }

}  // namespace fastformer
