// Storage types the kernels read and write, shared by host code (the *_ops.cpp files map
// at::ScalarType onto it) and kernels (which switch on it to pick an instantiation).
#pragma once

namespace fastformer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace fastformer
