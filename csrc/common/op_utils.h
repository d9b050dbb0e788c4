// Host-side helpers of the *_ops.cpp files: input checks with clear messages, the storage type of
// a tensor, alignment for 16-byte vector accesses. Torch headers only; no kernel code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "common/dtype.h"
#include "common/op_device.h"

namespace fastformer {

inline DType storage_type(at::ScalarType type, const char* op, const char* name) {
  switch (type) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", type);
  }
}

inline DType storage_type(const at::Tensor& t, const char* op, const char* name) {
  return storage_type(t.scalar_type(), op, name);
}

// A CUDA tensor on `device` (the input's). The device is compared first: a CPU tensor next to a
// CUDA input is reported as on the wrong device, the input itself (device == its own) as not CUDA.
inline void check_on_device(const at::Tensor& t, const at::Device& device, const char* op,
                            const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the input is on ",
              device);
  TORCH_CHECK(on_kernel_device(t), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

// (rows, N) with unit column stride and a non-negative row stride, in `dtype`.
inline void check_rows(const at::Tensor& t, int64_t rows, int64_t n, at::ScalarType dtype,
                       const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, op, ": ", name,
              " must have shape (", rows, ", ", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(n <= 1 || t.stride(1) == 1, op, ": ", name,
              " must have contiguous columns (stride 1 along the last dim), got strides ",
              t.strides());
  TORCH_CHECK(t.stride(0) >= 0, op, ": ", name, " has a negative row stride");
}

// A per-column parameter: (N,), contiguous, in the activations' dtype or float32.
inline void check_param(const std::optional<at::Tensor>& t, int64_t n, at::ScalarType dtype,
                        const char* op, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, op, ": ", name, " must have shape (", n,
              ",), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(t->scalar_type() == dtype || t->scalar_type() == at::kFloat, op, ": ", name,
              " must have the input's dtype ", dtype, " or float32, got ", t->scalar_type());
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether (rows, N) tensor t can be read with vectors of `vec` elements (16 bytes, or 8 when a
// 16-bit tensor is read alongside float32 ones).
inline bool rows_vector_aligned(const at::Tensor& t, int64_t vec) {
  const auto bytes = static_cast<uintptr_t>(vec * t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0 && (t.size(0) <= 1 || t.stride(0) % vec == 0);
}

inline const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

// What a kernel's dropout seed pointer gets: the call's seed, one int64 on the input's device that
// the kernel loads (no host read, so a CUDA graph replay uses the seed its own draw wrote), or
// nullptr without dropout.
inline const int64_t* seed_pointer(const std::optional<at::Tensor>& seed, bool has_dropout,
                                   const at::Device& device, const char* op) {
  if (!has_dropout) return nullptr;
  TORCH_CHECK(seed.has_value(), op, ": dropout_p > 0 needs a seed");
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
              ": seed must be one int64, got ", seed->scalar_type(), " of shape ", seed->sizes());
  check_on_device(*seed, device, op, "seed");
  return seed->data_ptr<int64_t>();
}

}  // namespace fastformer
