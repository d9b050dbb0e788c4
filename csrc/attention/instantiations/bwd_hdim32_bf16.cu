// Attention backward kernels for head dim 32, bf16 (one translation unit per instantiation).
#include "attention/launch_template.cuh"

namespace fastformer {
namespace attention {
template void run_attention_bwd<32, __nv_bfloat16>(const AttentionBwdParams& params, cudaStream_t stream);
}  // namespace attention
}  // namespace fastformer
