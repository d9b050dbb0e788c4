// Attention forward (FlashAttention-2): one CTA per (block of 64 query rows, query head, batch).
//
// For each query row i (s in log2 units, see scores.cuh):
//   m = max_j s_ij;  l = sum_j 2^(s_ij - m);  lse_i = (m + log2 l) * ln 2
//   o_i = sum_j 2^(s_ij - m) keep_ij / (1 - p) v_j / l            (keep = 1 without dropout)
// computed online over key tiles of kBlockN keys: with m' the new running max,
//   l <- l 2^(m - m') + sum_j 2^(s_ij - m'),  acc <- acc 2^(m - m') + P~ V.
// A row whose scores are all -inf so far keeps m = -inf and uses 0 as the exponent base (no
// -inf - -inf = NaN); at the end l = 0 and it writes o = 0, lse = -inf.
//
// Work split: warp w owns query rows m0 + 16 w .. m0 + 16 w + 15 of the tile. S = Q K^T is one
// 16 x kBlockN accumulator per warp (C fragments, see device.cuh): the thread holds rows g and
// g + 8 of it, so the row max / sum are reduced over the quad with two shuffles, and P goes
// straight from the C fragments into the A fragments of P V. Only the quad-partial row sum is
// kept during the loop; it is reduced once at the end.
//
// Pipeline (cp.async, one shared buffer each for Q, K, V): K_j+1 is loaded while P_j V_j is
// computed and V_j while Q K_j^T and the softmax are; each __syncthreads both publishes the tile
// just waited for and guarantees that every warp is done with the buffer the next load reuses.
// Key tiles past the last key the block can see (key length, causal diagonal) are not visited;
// masking work is only done on tiles that cross the key end or the diagonal (or with an attn_mask
// / dropout: kGeneral).
#pragma once

#include "attention/device.cuh"
#include "attention/params.h"
#include "attention/scores.cuh"
#include "attention/traits.h"

namespace fastformer {
namespace attention {

template <typename Tr, bool kGeneral>
__global__ void __launch_bounds__(Tr::kThreads) attention_fwd_kernel(const AttentionParams p) {
  using T = typename Tr::Element;
  constexpr int BM = Tr::kBlockM, BN = Tr::kBlockN, HD = Tr::kHeadDim, LD = Tr::kSmemStride;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kNTiles = BN / 8;   // n8 tiles of S per warp
  constexpr int kDTiles = HD / 8;   // n8 tiles of the output accumulator
  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const GridPlace place = grid_place(p.len_q, p.heads_q);
  const int m0 = place.block * BM;
  const int h = place.head;
  const int b = place.batch;
  const int hk = h / p.group;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  const int key_len = key_length(p, b);
  int n_end = key_len;
  if (p.is_causal) n_end = min(n_end, m0 + BM);  // rows < m0 + BM see keys < m0 + BM
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  const ScoreRules rules(p, b, h, key_len);

  float acc[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g, g + 8 of the warp's 16
  float row_sum[2] = {0.0f, 0.0f};            // this thread's part of the row sums

  if (n_tiles > 0) {
    load_tile<BM, HD, LD, kThreads>(sQ, q, p.q_row_stride, p.len_q - m0, p.dim, p.load_bytes);
    load_tile<BN, HD, LD, kThreads>(sK, k, p.k_row_stride, key_len, p.dim, p.load_bytes);
    cp_async_commit();
  }

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    cp_async_wait<0>();
    __syncthreads();  // Q, K_j visible; every warp is done with V_j-1
    load_tile<BN, HD, LD, kThreads>(sV, v + n0 * p.v_row_stride, p.v_row_stride, key_len - n0, p.dim_v,
                                    p.load_bytes);
    cp_async_commit();

    // S = Q K_j^T: the warp's 16 rows x BN keys
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[4];
      ldsm_a<LD>(a, sQ, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bfrag[4];
        ldsm_b<LD>(bfrag, sK, nn * 16, kk * 16, lane);
        mma_16816<T>(s[2 * nn], a, bfrag[0], bfrag[1]);
        mma_16816<T>(s[2 * nn + 1], a, bfrag[2], bfrag[3]);
      }
    }

    // Scores in log2 units; element e of tile n is (row i = rows[e / 2], key n0 + 8 n + 2 t + e % 2).
    const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
    const bool need_mask =
        kGeneral || rules.has_padding_holes() || n0 + BN > key_len || (p.is_causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[n][e] = need_mask ? rules.score<kGeneral>(s[n][e], rows[e / 2], n0 + 8 * n + 2 * t + e % 2)
                            : s[n][e] * p.scale_log2;
      }
    }

    // Online softmax, row by row (r = 0: row g, r = 1: row g + 8).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad holds the whole row
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float base = mx == -INFINITY ? 0.0f : mx;
      const float alpha = fast_exp2(row_max[r] - base);  // 0 while the row had only -inf
      row_max[r] = mx;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
        s[n][2 * r] = fast_exp2(s[n][2 * r] - base);
        s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - base);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        acc[d][2 * r] *= alpha;
        acc[d][2 * r + 1] *= alpha;
      }
    }

    // Dropout on the probabilities that multiply V (the row sums above are before dropout).
    if (kGeneral && p.has_dropout) {
      const uint32_t keep = rules.keep_bits<kNTiles>(rows[0], n0 + 2 * t);
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = rows[e / 2], jj = n0 + 8 * n + 2 * t + e % 2;
          const bool kept = i < p.len_q && jj < p.len_k && ((keep >> (4 * n + e)) & 1u);
          s[n][e] = kept ? s[n][e] * p.dropout_scale : 0.0f;
        }
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // V_j visible; every warp is done with K_j
    if (j + 1 < n_tiles) {
      load_tile<BN, HD, LD, kThreads>(sK, k + (n0 + BN) * p.k_row_stride, p.k_row_stride, key_len - n0 - BN,
                                      p.dim, p.load_bytes);
      cp_async_commit();
    }

    // acc += P V_j: P (16 x BN) from the S fragments, k16 slice kk2 = n tiles 2 kk2, 2 kk2 + 1.
#pragma unroll
    for (int kk2 = 0; kk2 < BN / 16; ++kk2) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk2][0], s[2 * kk2][1]);
      a[1] = pack2<T>(s[2 * kk2][2], s[2 * kk2][3]);
      a[2] = pack2<T>(s[2 * kk2 + 1][0], s[2 * kk2 + 1][1]);
      a[3] = pack2<T>(s[2 * kk2 + 1][2], s[2 * kk2 + 1][3]);
#pragma unroll
      for (int dd = 0; dd < HD / 16; ++dd) {
        uint32_t bfrag[4];
        ldsm_b_trans<LD>(bfrag, sV, kk2 * 16, dd * 16, lane);
        mma_16816<T>(acc[2 * dd], a, bfrag[0], bfrag[1]);
        mma_16816<T>(acc[2 * dd + 1], a, bfrag[2], bfrag[3]);
      }
    }
  }

  // Epilogue: o = acc / l, lse = (m + log2 l) ln 2; rows with l = 0 (no key): o = 0, lse = -inf.
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = row_sum[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const bool alive = sum > 0.0f;
    const float inv = alive ? 1.0f / sum : 0.0f;
    const int i = m0 + warp * 16 + g + 8 * r;
    if (i < p.len_q) {
      T* out_row = out + i * p.o_row_stride;
#pragma unroll
      for (int d = 0; d < kDTiles; ++d) {
        store_pair<T>(out_row, 8 * d + 2 * t, p.dim_v, acc[d][2 * r] * inv, acc[d][2 * r + 1] * inv,
                      p.pair_stores);
      }
      if (t == 0) lse[i] = alive ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

}  // namespace attention
}  // namespace fastformer
