// torch side of bias + GELU (+ dropout): schemas, input checks, allocation, launch on the current
// stream, and the Meta (shape-only) implementations.
//
//   fastformer::cuda_bias_gelu_fwd -> out (rows, N) = dropout(gelu(x + bias))
//   fastformer::cuda_bias_gelu_bwd -> (grad_x, grad_bias or empty), the dropout mask drawn again
//                                     from the seed (math in bias_gelu.h)
// dropout_p in [0, 1); with dropout_p > 0 the seed is one int64 on x's device, which the kernels
// load (never read on the host).
// x and grad_out are (rows, N) with contiguous columns (the Python side, fastformer/cuda/bias_gelu.py,
// views any input that way and restores its shape).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/op_device.h"
#include "common/op_utils.h"
#include "gelu/bias_gelu.h"

namespace fastformer {
namespace bias_gelu {
namespace {

constexpr const char* kFwd = "cuda_bias_gelu_fwd";
constexpr const char* kBwd = "cuda_bias_gelu_bwd";

bool is_tanh(c10::string_view approximate, const char* op) {
  TORCH_CHECK(approximate == "none" || approximate == "tanh", op,
              ": approximate must be 'none' or 'tanh', got '", std::string(approximate.data(), approximate.size()), "'");
  return approximate == "tanh";
}

void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (rows, N), got shape ", x.sizes());
  check_on_device(x, x.device(), op, "x");
  storage_type(x, op, "x");
  check_rows(x, x.size(0), x.size(1), x.scalar_type(), op, "x");
  TORCH_CHECK(x.size(1) >= 1, op, ": the last dim N must be >= 1");
}

void check_dropout_p(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
}

// Row groups wanted per launch: a few waves of 256-thread blocks; fewer with a bias gradient,
// whose partial rows are summed afterwards.
int64_t groups_wanted(bool bias_gradient) {
  const int sms = multiprocessor_count();
  return static_cast<int64_t>(sms) * (bias_gradient ? 4 : 16);
}

at::Tensor fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                    c10::string_view approximate, double dropout_p,
                    const std::optional<at::Tensor>& seed) {
  check_x(x, kFwd);
  const int64_t rows = x.size(0), n = x.size(1);
  if (bias.has_value()) check_on_device(*bias, x.device(), kFwd, "bias");
  check_param(bias, n, x.scalar_type(), kFwd, "bias");
  const bool tanh = is_tanh(approximate, kFwd);
  check_dropout_p(dropout_p, kFwd);
  const int64_t* seed_ptr = seed_pointer(seed, dropout_p > 0.0, x.device(), kFwd);
  const KernelDeviceGuard guard(x.device());
  at::Tensor out = at::empty({rows, n}, x.options());
  if (rows == 0) return out;

  FwdParams p{};
  p.dtype = storage_type(x, kFwd, "x");
  p.x = x.data_ptr();
  p.bias = data_or_null(bias);
  p.bias_float32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.out = out.data_ptr();
  p.rows = rows;
  p.n = n;
  p.stride_x = x.stride(0);
  p.tanh = tanh;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = seed_ptr;
  const int64_t vec = 16 / x.element_size();
  const bool aligned = rows_vector_aligned(x, vec) && aligned16(p.bias);
  const LaunchShape shape = launch_shape(rows, n, static_cast<int>(x.element_size()), aligned,
                                         groups_wanted(false));
  launch_fwd(p, shape, kernel_stream());
  FASTFORMER_CHECK_LAUNCH();
  return out;
}

std::tuple<at::Tensor, at::Tensor> bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                            const std::optional<at::Tensor>& bias,
                                            c10::string_view approximate, double dropout_p,
                                            const std::optional<at::Tensor>& seed) {
  check_x(x, kBwd);
  const int64_t rows = x.size(0), n = x.size(1);
  check_on_device(grad_out, x.device(), kBwd, "grad_out");
  check_rows(grad_out, rows, n, x.scalar_type(), kBwd, "grad_out");
  if (bias.has_value()) check_on_device(*bias, x.device(), kBwd, "bias");
  check_param(bias, n, x.scalar_type(), kBwd, "bias");
  const bool tanh = is_tanh(approximate, kBwd);
  check_dropout_p(dropout_p, kBwd);
  const int64_t* seed_ptr = seed_pointer(seed, dropout_p > 0.0, x.device(), kBwd);
  const KernelDeviceGuard guard(x.device());
  at::Tensor grad_x = at::empty({rows, n}, x.options());
  if (rows == 0) {
    return {grad_x, bias.has_value() ? at::zeros({n}, bias->options()) : at::empty({0}, x.options())};
  }

  const int64_t vec = 16 / x.element_size();
  const bool aligned = rows_vector_aligned(x, vec) && rows_vector_aligned(grad_out, vec) &&
                       aligned16(data_or_null(bias));
  const LaunchShape shape = launch_shape(rows, n, static_cast<int>(x.element_size()), aligned,
                                         groups_wanted(bias.has_value()));
  at::Tensor partial = bias.has_value()
                           ? at::empty({shape.row_groups, n}, x.options().dtype(at::kFloat))
                           : at::Tensor();
  BwdParams p{};
  p.dtype = storage_type(x, kBwd, "x");
  p.grad_out = grad_out.data_ptr();
  p.x = x.data_ptr();
  p.bias = data_or_null(bias);
  p.bias_float32 = bias.has_value() && bias->scalar_type() == at::kFloat;
  p.grad_x = grad_x.data_ptr();
  p.partial_grad_bias = bias.has_value() ? partial.data_ptr<float>() : nullptr;
  p.rows = rows;
  p.n = n;
  p.stride_grad_out = grad_out.stride(0);
  p.stride_x = x.stride(0);
  p.tanh = tanh;
  p.dropout_p = static_cast<float>(dropout_p);
  p.seed = seed_ptr;
  launch_bwd(p, shape, kernel_stream());
  FASTFORMER_CHECK_LAUNCH();
  at::Tensor grad_bias = bias.has_value() ? partial.sum(0).to(bias->scalar_type())
                                          : at::empty({0}, x.options());
  return {grad_x, grad_bias};
}

at::Tensor fwd_meta(const at::Tensor& x, const std::optional<at::Tensor>& bias,
                    c10::string_view approximate, double dropout_p,
                    const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2, kFwd, ": x must be 2-D (rows, N), got shape ", x.sizes());
  return at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options());
}

std::tuple<at::Tensor, at::Tensor> bwd_meta(const at::Tensor& grad_out, const at::Tensor& x,
                                            const std::optional<at::Tensor>& bias,
                                            c10::string_view approximate, double dropout_p,
                                            const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2, kBwd, ": x must be 2-D (rows, N), got shape ", x.sizes());
  at::Tensor grad_bias = bias.has_value() ? at::empty_symint({x.sym_size(1)}, bias->options())
                                          : at::empty({0}, x.options());
  return {at::empty_symint({x.sym_size(0), x.sym_size(1)}, x.options()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FASTFORMER_OPS_NAMESPACE, m) {
  m.def("cuda_bias_gelu_fwd(Tensor x, Tensor? bias, str approximate, float dropout_p, Tensor? seed) -> Tensor");
  m.def(
      "cuda_bias_gelu_bwd(Tensor grad_out, Tensor x, Tensor? bias, str approximate, float dropout_p, "
      "Tensor? seed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, FASTFORMER_KERNEL_DISPATCH_KEY, m) {
  m.impl("cuda_bias_gelu_fwd", &fwd_cuda);
  m.impl("cuda_bias_gelu_bwd", &bwd_cuda);
}

TORCH_LIBRARY_IMPL(FASTFORMER_OPS_NAMESPACE, Meta, m) {
  m.impl("cuda_bias_gelu_fwd", &fwd_meta);
  m.impl("cuda_bias_gelu_bwd", &bwd_meta);
}

}  // namespace bias_gelu
}  // namespace fastformer
