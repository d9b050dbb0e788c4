// torch side of the dropout keep-mask: fastformer::cuda_dropout_keep_mask(seed, shape, dropout_p).
//
// The mask is made on the seed's device (a 0-dim int64 tensor): CUDA runs the kernel, CPU runs
// the same Philox function on the host, so the host path can be checked against the Triton
// backend's mask on a machine without a GPU. Meta gives the shape only.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/op_device.h"
#include "common/philox.cuh"
#include "dropout/dropout.h"

namespace fastformer {
namespace dropout {
namespace {

constexpr const char* kOp = "cuda_dropout_keep_mask";

void check_args(const at::Tensor& seed, double dropout_p) {
  TORCH_CHECK(seed.dim() == 0 && seed.scalar_type() == at::kLong, kOp,
              ": seed must be a 0-dim int64 tensor, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kOp, ": dropout_p must be in [0, 1], got ",
              dropout_p);
}

// Rows are the last dim (a 0-dim tensor: one row of one element).
int64_t row_length(const at::Tensor& keep) { return keep.dim() == 0 ? 1 : keep.size(-1); }

at::Tensor keep_mask_cpu(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p) {
  check_args(seed, dropout_p);
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  const uint64_t key = static_cast<uint64_t>(seed.item<int64_t>());
  const uint32_t drop_threshold = Philox::drop_threshold(static_cast<float>(dropout_p));
  bool* out = keep.data_ptr<bool>();
  const int64_t length = row_length(keep);
  const int64_t rows = length == 0 ? 0 : keep.numel() / length;
  // A group of 8 at a time (keep_group, as the attention kernels draw them), so that the host
  // tests check keep_group; the CUDA keep-mask kernel evaluates keep() per element.
  constexpr int64_t kGroup = Philox::kGroup;
  for (int64_t row = 0; row < rows; ++row) {
    for (int64_t col8 = 0; col8 < length; col8 += kGroup) {
      const uint32_t bits = Philox::keep_group(key, static_cast<uint64_t>(row), static_cast<uint64_t>(col8),
                                               static_cast<uint64_t>(length), drop_threshold);
      for (int64_t k = 0; k < kGroup && col8 + k < length; ++k) out[row * length + col8 + k] = (bits >> k) & 1u;
    }
  }
  return keep;
}

at::Tensor keep_mask_cuda(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p) {
  check_args(seed, dropout_p);
  const KernelDeviceGuard guard(seed.device());
  at::Tensor keep = at::empty(shape, seed.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  KeepMaskParams p{};
  p.seed = seed.data_ptr<int64_t>();
  p.keep = keep.data_ptr<bool>();
  p.numel = keep.numel();
  p.row_length = row_length(keep);
  p.dropout_p = static_cast<float>(dropout_p);
  launch_keep_mask(p, kernel_stream());
  FASTFORMER_CHECK_LAUNCH();
  return keep;
}

at::Tensor keep_mask_meta(const at::Tensor& seed, at::IntArrayRef shape, double dropout_p) {
  return at::empty(shape, seed.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FASTFORMER_OPS_NAMESPACE, m) {
  m.def("cuda_dropout_keep_mask(Tensor seed, int[] shape, float dropout_p) -> Tensor");
}

// The CPU emulator registers the kernel for CPU tensors (FASTFORMER_KERNEL_DISPATCH_KEY is CPU
// there), in place of the host implementation.
#if !defined(FASTFORMER_CPU_EMULATION)
TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, CPU, m) { m.impl("cuda_dropout_keep_mask", &keep_mask_cpu); }
#endif
TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, FASTFORMER_KERNEL_DISPATCH_KEY, m) {
  m.impl("cuda_dropout_keep_mask", &keep_mask_cuda);
}
TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, Meta, m) { m.impl("cuda_dropout_keep_mask", &keep_mask_meta); }

}  // namespace dropout
}  // namespace fastformer
