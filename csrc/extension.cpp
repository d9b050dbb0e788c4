// Python module fastformer._C: the compiled CUDA backend of fastformer.
//
// Op kernels live in one folder per op (see README.md) and are registered with torch.library in
// their own file; this file only holds the pybind11 module and its build information.
#include <torch/extension.h>

#include <string>

namespace fastformer {
int cuda_runtime_version();  // build_info.cu
}  // namespace fastformer

// setup.py passes the GPU targets as -DFASTFORMER_CUDA_ARCHS=sm_80,sm_90a,compute_90 (no quotes,
// which would not survive the build's shell); turn them into a string here.
#define FASTFORMER_STRINGIFY_(...) #__VA_ARGS__
#define FASTFORMER_STRINGIFY(...) FASTFORMER_STRINGIFY_(__VA_ARGS__)
#ifdef FASTFORMER_CUDA_ARCHS
static constexpr const char* kCompiledArchs = FASTFORMER_STRINGIFY(FASTFORMER_CUDA_ARCHS);
#else
static constexpr const char* kCompiledArchs = "";
#endif

#ifdef TORCH_VERSION  // torch/version.h, included by torch/extension.h
static constexpr const char* kTorchVersion = TORCH_VERSION;
#else
static constexpr const char* kTorchVersion = "unknown";
#endif

static pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_runtime_version"] = fastformer::cuda_runtime_version();
  info["torch_version"] = std::string(kTorchVersion);
  info["compiled_archs"] = std::string(kCompiledArchs);
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastformer CUDA kernels (the \"cuda\" backend)";
  m.def("build_info", &build_info,
        "How this extension was built: cuda_runtime_version (CUDART_VERSION, e.g. 13000), "
        "torch_version and compiled_archs (GPU targets, e.g. 'sm_80,sm_90a,compute_90').");
}
