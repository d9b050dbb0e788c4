// Dispatch from (head dim, dtype) to the instantiation compiled in instantiations/*.cu.
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/launch.h"

namespace fastformer {
namespace attention {

namespace {
template <typename Fn>
void with_head_dim(int head_dim, Fn&& fn) {
  switch (head_dim) {
    case 32: return fn(std::integral_constant<int, 32>{});
    case 64: return fn(std::integral_constant<int, 64>{});
    case 96: return fn(std::integral_constant<int, 96>{});
    case 128: return fn(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "fastformer attention (cuda): no kernel for head dim ", head_dim);
  }
}
}  // namespace

void launch_attention_fwd(const AttentionParams& params, int head_dim, bool bf16, cudaStream_t stream) {
  with_head_dim(head_dim, [&](auto hd) {
    if (bf16) {
      run_attention_fwd<decltype(hd)::value, __nv_bfloat16>(params, stream);
    } else {
      run_attention_fwd<decltype(hd)::value, __half>(params, stream);
    }
  });
}

void launch_attention_bwd(const AttentionBwdParams& params, int head_dim, bool bf16, cudaStream_t stream) {
  with_head_dim(head_dim, [&](auto hd) {
    if (bf16) {
      run_attention_bwd<decltype(hd)::value, __nv_bfloat16>(params, stream);
    } else {
      run_attention_bwd<decltype(hd)::value, __half>(params, stream);
    }
  });
}

}  // namespace attention
}  // namespace fastformer
