// torch side of the fused residual + dropout + LayerNorm / RMSNorm: schemas, input checks,
// allocation, launch on the current stream, and the Meta (shape-only) implementations that let
// fake tensors and torch.compile trace the ops.
//
//   fastformer::cuda_residual_norm_fwd -> (out, residual_out or empty, mean or empty, rstd)
//   fastformer::cuda_residual_norm_bwd -> (grad_x, grad_residual, grad_weight, grad_bias),
//                                         each empty when absent
// out and residual_out come in the stream type: the residual's dtype, else x's. x may be a 16-bit
// type next to a float32 residual (autocast); grad_x then comes in x_dtype.
// The contract is the Triton launcher's (fastformer/triton/layer_norm.py); the Python side
// (fastformer/cuda/layer_norm.py) turns empty results back into None.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "common/op_device.h"
#include "common/op_utils.h"
#include "layer_norm/residual_norm.h"

namespace fastformer {
namespace residual_norm {
namespace {

using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
constexpr const char* kFwd = "cuda_residual_norm_fwd";
constexpr const char* kBwd = "cuda_residual_norm_bwd";

void check_hidden(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D (rows, N), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= kMaxHidden, op, ": the normalised size N must be in 1..",
              kMaxHidden, ", got ", t.size(1));
}

// The (x, stream) dtype pair: one dtype, or a 16-bit x with a float32 stream.
void check_mixed_types(at::ScalarType x_dtype, at::ScalarType dtype, const char* op, const char* x_name,
                       const char* stream_name) {
  TORCH_CHECK(mixed_types_supported(storage_type(x_dtype, op, x_name), storage_type(dtype, op, stream_name)),
              op, ": ", x_name, " (", x_dtype, ") must have the dtype of ", stream_name, " (", dtype,
              "), or be float16 / bfloat16 with a float32 ", stream_name);
}

Tensors4 fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  double eps, double dropout_p, bool rms, const std::optional<at::Tensor>& seed,
                  bool store_residual) {
  check_hidden(x, kFwd, "x");
  const int64_t rows = x.size(0), n = x.size(1);
  const at::ScalarType x_dtype = x.scalar_type();
  const at::ScalarType dtype = residual.has_value() ? residual->scalar_type() : x_dtype;  // the stream's
  check_mixed_types(x_dtype, dtype, kFwd, "x", "residual");
  check_on_device(x, x.device(), kFwd, "x");
  check_rows(x, rows, n, x_dtype, kFwd, "x");
  if (residual.has_value()) {
    check_on_device(*residual, x.device(), kFwd, "residual");
    check_rows(*residual, rows, n, dtype, kFwd, "residual");
  }
  for (auto [param, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (param->has_value()) check_on_device(**param, x.device(), kFwd, name);
    check_param(*param, n, dtype, kFwd, name);
  }
  TORCH_CHECK(!(rms && bias.has_value()), kFwd, ": RMSNorm takes no bias");
  TORCH_CHECK(eps >= 0.0, kFwd, ": eps must be >= 0, got ", eps);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kFwd, ": dropout_p must be in [0, 1], got ",
              dropout_p);
  TORCH_CHECK(rows <= INT_MAX, kFwd, ": at most ", INT_MAX, " rows, got ", rows);

  const KernelDeviceGuard guard(x.device());
  const auto options = x.options().dtype(dtype);
  at::Tensor out = at::empty({rows, n}, options);
  at::Tensor residual_out = store_residual ? at::empty({rows, n}, options) : at::empty({0}, options);
  const auto stats = options.dtype(at::kFloat);
  at::Tensor mean = at::empty({rms ? 0 : rows}, stats);
  at::Tensor rstd = at::empty({rows}, stats);
  if (rows == 0) return {out, residual_out, mean, rstd};

  FwdParams p{};
  p.dtype = storage_type(dtype, kFwd, "residual");
  p.x_dtype = storage_type(x_dtype, kFwd, "x");
  p.x = x.data_ptr();
  p.residual = data_or_null(residual);
  p.weight = data_or_null(weight);
  p.bias = data_or_null(bias);
  p.weight_float32 = weight.has_value() && weight->scalar_type() == at::kFloat;
  p.bias_float32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.out = out.data_ptr();
  p.residual_out = store_residual ? residual_out.data_ptr() : nullptr;
  p.mean = rms ? nullptr : mean.data_ptr<float>();
  p.rstd = rstd.data_ptr<float>();
  p.rows = rows;
  p.n = n;
  p.stride_x = x.stride(0);
  p.stride_residual = residual.has_value() ? residual->stride(0) : 0;
  p.eps = static_cast<float>(eps);
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = seed_pointer(seed, dropout_p > 0.0, x.device(), kFwd);
  p.rms = rms;

  const int64_t element_size = out.element_size();  // the stream type's: the vector width follows it
  const int64_t vec = 16 / element_size;
  const bool aligned = rows_vector_aligned(x, vec) &&
                       (!residual.has_value() || rows_vector_aligned(*residual, vec)) &&
                       aligned16(p.weight) && aligned16(p.bias);
  const LaunchShape shape = launch_shape(n, static_cast<int>(element_size), aligned);
  TORCH_INTERNAL_ASSERT(shape.threads >= 32 && shape.threads <= 1024 && shape.threads % 32 == 0);
  launch_fwd(p, shape, kernel_stream());
  FASTFORMER_CHECK_LAUNCH();
  return {out, residual_out, mean, rstd};
}

Tensors4 bwd_cuda(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
                  const at::Tensor& normed, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& rstd, double dropout_p,
                  bool rms, const std::optional<at::Tensor>& seed, bool has_residual,
                  std::optional<at::ScalarType> x_dtype) {
  check_hidden(normed, kBwd, "normed");
  const int64_t rows = normed.size(0), n = normed.size(1);
  const at::ScalarType dtype = normed.scalar_type();
  const DType storage = storage_type(normed, kBwd, "normed");
  const at::ScalarType grad_x_dtype = x_dtype.value_or(dtype);
  check_mixed_types(grad_x_dtype, dtype, kBwd, "x_dtype", "normed");
  const at::Device device = normed.device();
  check_on_device(normed, device, kBwd, "normed");
  check_rows(normed, rows, n, dtype, kBwd, "normed");
  check_on_device(grad_out, device, kBwd, "grad_out");
  check_rows(grad_out, rows, n, dtype, kBwd, "grad_out");
  if (grad_residual_out.has_value()) {
    check_on_device(*grad_residual_out, device, kBwd, "grad_residual_out");
    check_rows(*grad_residual_out, rows, n, dtype, kBwd, "grad_residual_out");
  }
  for (auto [param, name] : {std::pair{&weight, "weight"}, std::pair{&bias, "bias"}}) {
    if (param->has_value()) check_on_device(**param, device, kBwd, name);
    check_param(*param, n, dtype, kBwd, name);
  }
  check_on_device(rstd, device, kBwd, "rstd");
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == rows && rstd.scalar_type() == at::kFloat &&
                  rstd.is_contiguous(),
              kBwd, ": rstd must be a contiguous float32 tensor of shape (", rows, ",), got ",
              rstd.scalar_type(), " ", rstd.sizes());
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, kBwd, ": dropout_p must be in [0, 1], got ",
              dropout_p);

  const KernelDeviceGuard guard(device);
  const auto options = normed.options();
  at::Tensor grad_x = at::empty({rows, n}, options.dtype(grad_x_dtype));
  at::Tensor grad_residual = has_residual ? at::empty({rows, n}, options) : at::empty({0}, options);
  if (rows == 0) {
    auto zeros_like_param = [&](const std::optional<at::Tensor>& t) {
      return t.has_value() ? at::zeros({n}, t->options()) : at::empty({0}, options);
    };
    return {grad_x, grad_residual, zeros_like_param(weight), zeros_like_param(bias)};
  }

  const int64_t vec = 16 / normed.element_size();
  const bool aligned = rows_vector_aligned(normed, vec) && rows_vector_aligned(grad_out, vec) &&
                       (!grad_residual_out.has_value() || rows_vector_aligned(*grad_residual_out, vec)) &&
                       aligned16(data_or_null(weight));
  const LaunchShape shape = launch_shape(n, static_cast<int>(normed.element_size()), aligned);
  // A fixed grid that fills the GPU: its blocks walk the rows, each writes one partial row.
  const int sms = multiprocessor_count();
  const int64_t row_units = shape.warp_per_row ? (rows + kWarpsPerBlock - 1) / kWarpsPerBlock : rows;
  const int64_t wanted = shape.warp_per_row ? 4 * sms : sms * std::max(1, 1024 / shape.threads);
  const int partials = static_cast<int>(std::max<int64_t>(1, std::min(row_units, wanted)));
  const auto stats = options.dtype(at::kFloat);
  at::Tensor partial_weight = weight.has_value() ? at::empty({partials, n}, stats) : at::Tensor();
  at::Tensor partial_bias = bias.has_value() ? at::empty({partials, n}, stats) : at::Tensor();

  BwdParams p{};
  p.dtype = storage;
  p.x_dtype = storage_type(grad_x_dtype, kBwd, "x_dtype");
  p.grad_out = grad_out.data_ptr();
  p.grad_residual_out = data_or_null(grad_residual_out);
  p.normed = normed.data_ptr();
  p.weight = data_or_null(weight);
  p.weight_float32 = weight.has_value() && weight->scalar_type() == at::kFloat;
  p.rstd = rstd.data_ptr<float>();
  p.grad_x = grad_x.data_ptr();
  p.grad_residual = has_residual ? grad_residual.data_ptr() : nullptr;
  p.partial_grad_weight = weight.has_value() ? partial_weight.data_ptr<float>() : nullptr;
  p.partial_grad_bias = bias.has_value() ? partial_bias.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.n = n;
  p.stride_grad_out = grad_out.stride(0);
  p.stride_grad_residual_out = grad_residual_out.has_value() ? grad_residual_out->stride(0) : 0;
  p.stride_normed = normed.stride(0);
  p.partials = partials;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = seed_pointer(seed, dropout_p > 0.0, device, kBwd);
  p.rms = rms;
  launch_bwd(p, shape, kernel_stream());
  FASTFORMER_CHECK_LAUNCH();

  // The partial rows, summed in a fixed order (deterministic), in the parameters' dtypes.
  at::Tensor grad_weight = weight.has_value() ? partial_weight.sum(0).to(weight->scalar_type())
                                              : at::empty({0}, options);
  at::Tensor grad_bias = bias.has_value() ? partial_bias.sum(0).to(bias->scalar_type())
                                          : at::empty({0}, options);
  return {grad_x, grad_residual, grad_weight, grad_bias};
}

// Shapes only (Meta tensors, fake tensors under torch.compile); symbolic sizes kept.
Tensors4 fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                  const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  double eps, double dropout_p, bool rms, const std::optional<at::Tensor>& seed,
                  bool store_residual) {
  TORCH_CHECK(x.dim() == 2, kFwd, ": x must be 2-D (rows, N), got shape ", x.sizes());
  const c10::SymInt rows = x.sym_size(0), n = x.sym_size(1);
  const auto options = x.options().dtype(residual.has_value() ? residual->scalar_type() : x.scalar_type());
  const auto stats = options.dtype(at::kFloat);
  at::Tensor out = at::empty_symint({rows, n}, options);
  at::Tensor residual_out = store_residual ? at::empty_symint({rows, n}, options)
                                           : at::empty({0}, options);
  at::Tensor mean = rms ? at::empty({0}, stats) : at::empty_symint({rows}, stats);
  return {out, residual_out, mean, at::empty_symint({rows}, stats)};
}

Tensors4 bwd_meta(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_residual_out,
                  const at::Tensor& normed, const std::optional<at::Tensor>& weight,
                  const std::optional<at::Tensor>& bias, const at::Tensor& rstd, double dropout_p,
                  bool rms, const std::optional<at::Tensor>& seed, bool has_residual,
                  std::optional<at::ScalarType> x_dtype) {
  TORCH_CHECK(normed.dim() == 2, kBwd, ": normed must be 2-D (rows, N), got shape ", normed.sizes());
  const c10::SymInt rows = normed.sym_size(0), n = normed.sym_size(1);
  const auto options = normed.options();
  auto param_grad = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? at::empty_symint({n}, t->options()) : at::empty({0}, options);
  };
  return {at::empty_symint({rows, n}, options.dtype(x_dtype.value_or(normed.scalar_type()))),
          has_residual ? at::empty_symint({rows, n}, options) : at::empty({0}, options),
          param_grad(weight), param_grad(bias)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FASTFORMER_OPS_NAMESPACE, m) {
  m.def(
      "cuda_residual_norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "float dropout_p, bool rms, Tensor? seed, bool store_residual) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "cuda_residual_norm_bwd(Tensor grad_out, Tensor? grad_residual_out, Tensor normed, "
      "Tensor? weight, Tensor? bias, Tensor rstd, float dropout_p, bool rms, Tensor? seed, "
      "bool has_residual, ScalarType? x_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, FASTFORMER_KERNEL_DISPATCH_KEY, m) {
  m.impl("cuda_residual_norm_fwd", &fwd_cuda);
  m.impl("cuda_residual_norm_bwd", &bwd_cuda);
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, Meta, m) {
  m.impl("cuda_residual_norm_fwd", &fwd_meta);
  m.impl("cuda_residual_norm_bwd", &bwd_meta);
}

}  // namespace residual_norm
}  // namespace fastformer
