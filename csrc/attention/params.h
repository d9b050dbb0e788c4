// The plain struct the torch side (attention_ops.cpp) fills and the kernels read.
//
// Shapes: query (B, Hq, Lq, D), key (B, Hk, Lk, D), value (B, Hk, Lk, Dv), Hq % Hk == 0.
// Every tensor is addressed as base + b * batch_stride + h * head_stride + row * row_stride + col
// (element strides, int64; the last dim is contiguous). No torch types here, so that the kernels
// compile without the torch headers.
#pragma once

#include <cstdint>

namespace fastformer {
namespace attention {

// What the optional attn_mask holds (a runtime switch: uniform branches inside the kernels).
enum MaskKind : int {
  kNoMask = 0,
  kBoolMask = 1,   // uint8, nonzero = may attend (torch.bool viewed as uint8)
  kFloatMask = 2,  // float32, added to the scaled scores (-inf = may not attend)
};

struct AttentionParams {
  // Inputs, in the dtype of the instantiation (half or bfloat16).
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;

  // Forward output (B, Hq, Lq, Dv), any strides; read again by the backward's preprocess.
  void* out;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  // Log-sum-exp of each query row's scaled, masked scores (natural log, float32, (B, Hq, Lq)
  // contiguous); -inf on rows with no key to attend to.
  float* lse;

  // Optional attn_mask viewed as (B, Hq, Lq, Lk): stride 0 on broadcast dims.
  const void* mask;
  int mask_kind;  // MaskKind
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;

  // Optional key padding, or all nullptr = every key attended: key_padding_mask (B, Lk), True =
  // padding, as bytes, and what the key-range kernel (key_range.cu) found in them on the device,
  // before the attention kernels run (no host synchronisation):
  //   key_ends[b]: one past batch row b's last unpadded key (0 if none); key tiles from there on
  //     are skipped, so right padding (the usual case) costs no work;
  //   key_padding_holes[b]: nonzero when row b has padding before key_ends[b] (not a right
  //     padding): only then are the padding bytes of the keys it visits tested;
  //   key_padding: the mask as bytes (nonzero = padding), key_padding_batch_stride per batch row.
  const int32_t* key_ends;
  const int32_t* key_padding_holes;
  const uint8_t* key_padding;
  int64_t key_padding_batch_stride;

  int batch, heads_q, heads_k, group;  // group = Hq / Hk
  int len_q, len_k;
  int dim, dim_v;  // the real head dims (the kernel's head dim is these padded up)

  float scale;       // softmax scale
  float scale_log2;  // scale * log2(e): the kernels work with exp2

  bool is_causal;  // top-left aligned: query i attends keys j <= i

  // Dropout: element (b, h, i, j) is kept when Philox::keep(seed, (b Hq + h) Lq + i, j, Lk, p).
  bool has_dropout;
  float dropout_p;
  float dropout_scale;  // 1 / (1 - p)
  const int64_t* seed;  // one int64 on the device, loaded by the kernels; nullptr without dropout

  // How tiles of q, k, v (and grad_out in the backward) are loaded, by the alignment of every
  // row start: 16 (16-byte aligned: 16-byte cp.async), 4 (4-byte aligned, e.g. head dim 50 in a
  // (B, L, H, D) projection: 4-byte cp.async, still asynchronous) or 0 (element-wise loads).
  int load_bytes;
  // Every pair of output elements (col 2t, 2t+1) is 4-byte aligned: stores of two at a time.
  bool pair_stores;
};

// The key-range kernel's: each batch row's key end and holes (as above) from its padding bytes.
struct KeyRangeParams {
  const uint8_t* key_padding;  // (B, Lk) bytes, nonzero = padding, unit key stride
  int64_t key_padding_batch_stride;
  int batch, len_k;
  int32_t* key_ends;           // (B,) out
  int32_t* key_padding_holes;  // (B,) out: 1 or 0
};

struct AttentionBwdParams : AttentionParams {
  const void* grad_out;  // dO (B, Hq, Lq, Dv)
  int64_t do_batch_stride, do_head_stride, do_row_stride;
  float* delta;  // (B, Hq, Lq) float32 contiguous: rowsum(dO * O), written by the preprocess

  void* grad_q;  // (B, Hq, Lq, D), written by the dQ kernel (when grad_q_sum is null)
  int64_t dq_batch_stride, dq_head_stride, dq_row_stride;
  // Or, when not null: dQ summed with float32 atomics by the dK/dV kernel (B, Hq, Lq, D), unit
  // column stride, zeroed by the delta kernel; the torch side casts it into grad_q. No dQ kernel.
  float* grad_q_sum;
  int64_t dqs_batch_stride, dqs_head_stride, dqs_row_stride;
  bool pair_atomics;  // every pair (col 2t, 2t+1) of grad_q_sum is 8-byte aligned (atomic_add_pair)
  void* grad_k;  // (B, Hk, Lk, D)
  int64_t dk_batch_stride, dk_head_stride, dk_row_stride;
  void* grad_v;  // (B, Hk, Lk, Dv)
  int64_t dv_batch_stride, dv_head_stride, dv_row_stride;
  // Optional, with a float mask: its gradient d attn_mask = dS, written by the dK/dV kernel into
  // a zero-filled float32 tensor viewed as (B, Hq, Lq, Lk). Stored where that tensor has the full
  // shape (each score is visited once); where it broadcasts (stride 0 on those dims,
  // grad_mask_atomic), added with atomicAdd. nullptr: no mask gradient.
  float* grad_mask;
  int64_t dm_batch_stride, dm_head_stride, dm_row_stride, dm_col_stride;
  bool grad_mask_atomic;
};

}  // namespace attention
}  // namespace fastformer
