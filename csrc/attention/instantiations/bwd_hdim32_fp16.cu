// Attention backward kernels for head dim 32, fp16 (one translation unit per instantiation).
#include "attention/launch_template.cuh"

namespace fastformer {
namespace attention {
template void run_attention_bwd<32, __half>(const AttentionBwdParams& params, cudaStream_t stream);
}  // namespace attention
}  // namespace fastformer
