// Which (query i, key j) pairs a CTA's scores keep, and the dropout keep-mask, for one
// (batch b, query head h). Shared by the forward and both backward kernels, so that all three see
// exactly the same probabilities.
//
//   s_ij = scale * q_i . k_j (+ float mask_ij)        in log2 units (times log2 e), or -inf when
//   i >= Lq, j >= key_end(b), key j is padding, (causal and j > i), or the bool mask forbids it.
//   keep_ij = Philox::keep(seed, (b Hq + h) Lq + i, j, Lk, drop_threshold(p))   (row, column and
//   row length, as Triton), evaluated a group of 8 keys at a time: see keep_bits.
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
  uint32_t drop_threshold;  // Philox::drop_threshold(p)

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
    drop_threshold = Philox::drop_threshold(p.dropout_p);
  }

  // Whether a tile may hold padding keys before the key end (then every score must be masked).
  __device__ __forceinline__ bool has_padding_holes() const { return padding != nullptr; }
  // Whether an attn_mask applies (then every score must be masked; dropout alone needs no mask).
  __device__ __forceinline__ bool has_attn_mask() const { return bool_mask != nullptr || float_mask != nullptr; }

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

  // Dropout keep bits of one thread's scores in kTiles n8 tiles: bit 4 n + e for score e of tile n.
  // One Philox call yields the bits of 8 neighbouring keys of one query (a group), and each group's
  // bits are shared by warp shuffles between the lanes that hold its scores, so a thread draws one
  // call per 8 of its scores. Every lane of the warp must call it (shuffles); scores past Lq / Lk
  // get bits the caller masks.
  //
  // Row-major C layout (forward, dQ): score e = 2r + c of tile n is (query i0 + 8r, key j0 + 8n + c),
  // j0 = key tile start + 2t, t = lane % 4. For two tiles n, n + 1 the quad (lanes t = 0..3) holds
  // 4 groups (query i0 or i0 + 8, tile n or n + 1): lane t draws group (query i0 + 8 (t % 2),
  // tile n + t / 2) into byte t, and two butterflies give each lane all four bytes.
  template <int kTiles>
  __device__ __forceinline__ uint32_t keep_bits(int i0, int j0) const {
    static_assert(kTiles % 2 == 0 && 4 * kTiles <= 32, "tiles in pairs, 4 bits each, in one uint32");
    const int t = (j0 >> 1) & 3;
    const int j8 = j0 & ~7;
    uint32_t bits = 0;
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t all = group_keep_bits(i0 + 8 * (t & 1), j8 + 8 * (n + (t >> 1))) << (8 * t);
      all |= __shfl_xor_sync(0xffffffffu, all, 1);
      all |= __shfl_xor_sync(0xffffffffu, all, 2);
      // byte r + 2q: query i0 + 8r, tile n + q; this lane's keys are its bits 2t, 2t + 1
#pragma unroll
      for (int q = 0; q < 2; ++q) {
#pragma unroll
        for (int r = 0; r < 2; ++r) bits |= ((all >> (8 * (r + 2 * q) + 2 * t)) & 3u) << (4 * (n + q) + 2 * r);
      }
    }
    return bits;
  }

  // Transposed C layout (dK/dV): score e = 2r + c of tile n is (query i0 + 8n + c, key j0 + 8r),
  // j0 = the key of the lane's row g = lane / 4 (the warp's 16 keys start at a multiple of 8, so
  // j0 % 8 = g). For two tiles n, n + 1 the 8 lanes g = 0..7 of one t hold 8 groups (2 tiles x 2
  // queries x 2 key groups), and lane g needs bit g of each. Lane g draws group P = g: (query
  // i0 + 8 (n + P / 4) + P % 2, keys from j0 - g + 8 (P / 2 % 2)), a row of an 8 x 8 bit matrix
  // M[P][k]; three butterfly stages (lanes ^ 4, ^ 8, ^ 16) transpose it, leaving M[P][g] in bit P,
  // which is bit 4 (P / 4) + P % 4 of the two tiles' bits.
  template <int kTiles>
  __device__ __forceinline__ uint32_t keep_bits_transposed(int i0, int j0) const {
    static_assert(kTiles % 2 == 0 && 4 * kTiles <= 32, "tiles in pairs, 4 bits each, in one uint32");
    const int g = j0 & 7;
    const int j8 = j0 & ~7;
    uint32_t bits = 0;
#pragma unroll
    for (int n = 0; n < kTiles; n += 2) {
      uint32_t row = group_keep_bits(i0 + 8 * (n + (g >> 2)) + (g & 1), j8 + 8 * ((g >> 1) & 1));
      // Stage s swaps bit s of the row index (the lane's g) with bit s of the column index.
#pragma unroll
      for (int s = 1; s <= 4; s *= 2) {
        const uint32_t high_cols = s == 1 ? 0xAAu : s == 2 ? 0xCCu : 0xF0u;  // columns k with k & s
        const uint32_t other = __shfl_xor_sync(0xffffffffu, row, 4 * s);
        row = (g & s) ? (row & high_cols) | ((other & high_cols) >> s)
                      : (row & ~high_cols & 0xFFu) | ((other & ~high_cols & 0xFFu) << s);
      }
      bits |= row << (4 * n);
    }
    return bits;
  }

  // Bit k: whether score (i, j8 + k) is kept, j8 a multiple of 8.
  __device__ __forceinline__ uint32_t group_keep_bits(int i, int j8) const {
    return Philox::keep_group(seed, dropout_row_base + static_cast<uint64_t>(i), static_cast<uint64_t>(j8),
                              static_cast<uint64_t>(len_k), drop_threshold);
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
