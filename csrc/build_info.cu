// Facts about how fastformer._C was compiled, from the CUDA side of the build.
#include <cuda_runtime_api.h>

namespace fastformer {

// The CUDA runtime version the extension was compiled against (e.g. 13000 for CUDA 13.0).
int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace fastformer
