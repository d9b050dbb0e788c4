// Which (query i, key j) pairs a CTA's scores keep, and the dropout keep-mask, for one
// (batch b, query head h). Shared by the forward and both backward kernels, so that all three see
// exactly the same probabilities.
//
//   s_ij = scale * q_i . k_j (+ float mask_ij)        in log2 units (times log2 e), or -inf when
//   i >= Lq, j >= key_end(b), key j is padding, (causal and j > i), or the bool mask forbids it.
//   keep_ij = Philox::keep(seed, (b Hq + h) Lq + i, j, Lk, p)   (row, column and row length, as Triton)
// (evaluated a group of 4 keys at a time: see keep_bits).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention/device.cuh"
#include "attention/params.h"
#include "common/philox.cuh"

namespace fastformer {
namespace attention {

// The largest magnitude of a float attn_mask value: finite values must stay finite in log2 units,
// but |m| log2(e) overflows float32 above 2.36e38, e.g. bfloat16's and float32's finfo.min, which
// Hugging Face fills its masks with; a row masked that way would turn into a row with no key (0
// instead of SDPA's result). kMaskLimit * log2(e) < FLT_MAX.
constexpr float kMaskLimit = 2.35e38f;

struct ScoreRules {
  const uint8_t* bool_mask;  // this (b, h)'s mask rows, or nullptr
  const float* float_mask;   // idem
  const uint8_t* padding;    // this batch row's key padding bytes when it has holes, else nullptr
  int64_t mask_row_stride, mask_col_stride;
  int len_q, len_k, key_len;
  bool is_causal;
  float scale_log2;
  uint64_t dropout_row_base;  // (b Hq + h) Lq
  uint64_t seed;
  float dropout_p;

  __device__ __forceinline__ ScoreRules(const AttentionParams& p, int b, int h, int key_len_) {
    const int64_t mask_offset = b * p.mask_batch_stride + h * p.mask_head_stride;
    bool_mask = p.mask_kind == kBoolMask ? static_cast<const uint8_t*>(p.mask) + mask_offset : nullptr;
    float_mask = p.mask_kind == kFloatMask ? static_cast<const float*>(p.mask) + mask_offset : nullptr;
    mask_row_stride = p.mask_row_stride;
    mask_col_stride = p.mask_col_stride;
    padding = p.key_padding != nullptr && p.key_padding_holes[b] != 0
                  ? p.key_padding + b * p.key_padding_batch_stride
                  : nullptr;
    len_q = p.len_q;
    len_k = p.len_k;
    key_len = key_len_;
    is_causal = p.is_causal;
    scale_log2 = p.scale_log2;
    dropout_row_base = (static_cast<uint64_t>(b) * p.heads_q + h) * static_cast<uint64_t>(p.len_q);
    seed = p.has_dropout ? static_cast<uint64_t>(*p.seed) : 0;
    dropout_p = p.dropout_p;
  }

  // Whether a tile may hold padding keys before the key end (then every score must be masked).
  __device__ __forceinline__ bool has_padding_holes() const { return padding != nullptr; }

  // The score of q_i . k_j = acc, in log2 units, -inf where (i, j) is not attended.
  // kGeneral: an attn_mask may be present (compiled out of the kernels without one).
  template <bool kGeneral>
  __device__ __forceinline__ float score(float acc, int i, int j) const {
    bool ok = i < len_q && j < key_len && (!is_causal || j <= i) && (padding == nullptr || padding[j] == 0);
    float s = acc * scale_log2;
    if (kGeneral && ok) {
      const int64_t offset = i * mask_row_stride + j * mask_col_stride;
      if (bool_mask != nullptr) {
        ok = bool_mask[offset] != 0;
      } else if (float_mask != nullptr) {
        // -inf forbids the key; finite values stay finite; NaN and +inf pass through (the row
        // becomes NaN, as in SDPA: fmaxf / fminf would drop a NaN)
        const float m = float_mask[offset];
        const float clamped = fabsf(m) < INFINITY ? fminf(fmaxf(m, -kMaskLimit), kMaskLimit) : m;
        s = m == -INFINITY ? -INFINITY : fmaf(clamped, kLog2e, s);
      }
    }
    return ok ? s : -INFINITY;
  }

  // Dropout keep bits (bit e: score e) of one thread's 4 scores of an n8 tile. One Philox call
  // yields the bits of 4 neighbouring keys (a group) and the lanes that hold a group's scores
  // share it, so a thread draws one call per 4 scores instead of 4. The call must be made by the
  // whole warp (shuffles), and indices past Lq / Lk get bits the caller masks.
  //
  // Row-major C layout (forward, dQ): score e = 2r + c is (query i0 + 8r, key j0 + c), j0 even.
  // Lanes t and t ^ 1 (lane ^ 1) hold the same two queries and between them the 4 keys of one
  // group: each draws its group for one of the queries and the pair swaps the bits.
  __device__ __forceinline__ uint32_t keep_bits(int i0, int j0) const {
    const int odd = (j0 >> 1) & 1;  // this lane holds keys 2, 3 of the group and draws query i0 + 8
    const uint32_t drawn = group_keep_bits(i0 + 8 * odd, j0 & ~3);
    const uint32_t swapped = __shfl_xor_sync(0xffffffffu, drawn, 1);
    const uint32_t query0 = odd ? swapped : drawn, query1 = odd ? drawn : swapped;
    const int shift = 2 * odd;
    return ((query0 >> shift) & 3u) | (((query1 >> shift) & 3u) << 2);
  }

  // Transposed C layout (dK/dV): score e = 2r + c is (query i0 + c, key j0 + 8r), j0 = the key of
  // row g. The 4 lanes g = 4u .. 4u + 3 (lane ^ 4, lane ^ 8; same t) hold the 4 keys of the same 4
  // (query, group) pairs: lane x = g % 4 draws pair x, and two butterflies give each all 16 bits.
  __device__ __forceinline__ uint32_t keep_bits_transposed(int i0, int j0) const {
    const int x = j0 & 3;  // the key's place in its group, and the pair this lane draws
    uint32_t all = group_keep_bits(i0 + (x & 1), (j0 & ~3) + 8 * (x >> 1)) << (4 * x);
    all |= __shfl_xor_sync(0xffffffffu, all, 4);
    all |= __shfl_xor_sync(0xffffffffu, all, 8);
    uint32_t bits = 0;
#pragma unroll
    for (int e = 0; e < 4; ++e) bits |= ((all >> (4 * e + x)) & 1u) << e;
    return bits;
  }

  // Bit k: whether score (i, j4 + k) is kept, j4 a multiple of 4.
  __device__ __forceinline__ uint32_t group_keep_bits(int i, int j4) const {
    return Philox::keep_group(seed, dropout_row_base + static_cast<uint64_t>(i), static_cast<uint64_t>(j4),
                              static_cast<uint64_t>(len_k), dropout_p);
  }
};

// One past the last key batch row b attends (its key end), at most Lk: keys from there on are
// padding, and their tiles are skipped.
__device__ __forceinline__ int key_length(const AttentionParams& p, int b) {
  if (p.key_ends == nullptr) return p.len_k;
  const int n = p.key_ends[b];
  return n < 0 ? 0 : (n > p.len_k ? p.len_k : n);
}

}  // namespace attention
}  // namespace fastformer
