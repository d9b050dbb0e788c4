// Attention forward (FlashAttention-2): one CTA per (block of kBlockM = 128 query rows, or 64 above
// head dim 64, query head, batch).
//
// For each query row i (s in log2 units, see scores.cuh):
//   m = max_j s_ij;  l = sum_j 2^(s_ij - m);  lse_i = (m + log2 l) * ln 2
//   o_i = sum_j 2^(s_ij - m) keep_ij / (1 - p) v_j / l            (keep = 1 without dropout)
// computed online over key tiles of kBlockN keys: with m' the new running max,
//   l <- l 2^(m - m') + sum_j 2^(s_ij - m'),  acc <- acc 2^(m - m') + P~ V.
// A row whose scores are all -inf so far keeps m = -inf and uses 0 as the exponent base (no
// -inf - -inf = NaN); at the end l = 0 and it writes o = 0, lse = -inf.
//
// Work split: warp w owns query rows m0 + R w .. m0 + R w + R - 1 of the block, R = 16 kFwdMTiles
// (traits.h), as kFwdMTiles m16 tiles. S = Q K^T is one 16 x kBlockN accumulator per m16 tile
// (C fragments, see device.cuh): the thread holds rows g and g + 8 of it, so the row max / sum
// are reduced over the quad with two shuffles, and P goes straight from the C fragments into the
// A fragments of P V. Each K and V fragment read from shared memory serves all the warp's m16
// tiles. Only the quad-partial row sum is kept during the loop; it is reduced once at the end.
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
  constexpr int kMTiles = Tr::kFwdMTiles;  // m16 tiles of query rows per warp
  constexpr int kNTiles = BN / 8;          // n8 tiles of S per m16 tile
  constexpr int kDTiles = HD / 8;          // n8 tiles of the output accumulator
  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());
  T* sK = sQ + BM * LD;
  T* sV = sK + BN * LD;

  const GridPlace place = grid_place(p.len_q, BM, p.heads_q);
  const int m0 = place.block * BM;
  const int h = place.head;
  const int b = place.batch;
  const int hk = h / p.group;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // First query row of the warp's m16 tile mt (its rows are this + g and + g + 8).
  const auto tile_row = [&](int mt) { return m0 + warp * Tr::kFwdRowsPerWarp + 16 * mt; };

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  const int key_len = key_length(p, b);
  int n_end = key_len;
  if (p.is_causal) n_end = min(n_end, m0 + BM);  // rows < m0 + BM see keys < m0 + BM
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  const ScoreRules rules(p, b, h, key_len);

  float acc[kMTiles][kDTiles][4];
  float row_max[kMTiles][2];  // rows g, g + 8 of each m16 tile
  float row_sum[kMTiles][2];  // this thread's part of the row sums
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) acc[mt][d][0] = acc[mt][d][1] = acc[mt][d][2] = acc[mt][d][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }

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

    // S = Q K_j^T: the warp's kMTiles x 16 rows x BN keys; each K fragment serves every m16 tile.
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldsm_a<LD>(a[mt], sQ, tile_row(mt) - m0, kk * 16, lane);
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bfrag[4];
        ldsm_b<LD>(bfrag, sK, nn * 16, kk * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(s[mt][2 * nn], a[mt], bfrag[0], bfrag[1]);
          mma_16816<T>(s[mt][2 * nn + 1], a[mt], bfrag[2], bfrag[3]);
        }
      }
    }

    const bool need_mask = (kGeneral && rules.has_attn_mask()) || rules.has_padding_holes() || n0 + BN > key_len ||
                           (p.is_causal && n0 + BN - 1 > m0);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      // Scores in log2 units; element e of tile n is (row i = rows[e / 2], key n0 + 8 n + 2 t + e % 2).
      const int rows[2] = {tile_row(mt) + g, tile_row(mt) + g + 8};
#pragma unroll
      for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][n][e] = need_mask ? rules.score<kGeneral>(s[mt][n][e], rows[e / 2], n0 + 8 * n + 2 * t + e % 2)
                                  : s[mt][n][e] * p.scale_log2;
        }
      }

      // Online softmax, row by row (r = 0: row g, r = 1: row g + 8).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[mt][r];
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) mx = fmaxf(mx, fmaxf(s[mt][n][2 * r], s[mt][n][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad holds the whole row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float base = mx == -INFINITY ? 0.0f : mx;
        const float alpha = fast_exp2(row_max[mt][r] - base);  // 0 while the row had only -inf
        row_max[mt][r] = mx;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kNTiles; ++n) {
          s[mt][n][2 * r] = fast_exp2(s[mt][n][2 * r] - base);
          s[mt][n][2 * r + 1] = fast_exp2(s[mt][n][2 * r + 1] - base);
          sum += s[mt][n][2 * r] + s[mt][n][2 * r + 1];
        }
        row_sum[mt][r] = row_sum[mt][r] * alpha + sum;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          acc[mt][d][2 * r] *= alpha;
          acc[mt][d][2 * r + 1] *= alpha;
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
            s[mt][n][e] = kept ? s[mt][n][e] * p.dropout_scale : 0.0f;
          }
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

    // acc += P V_j: P (16 x BN per m16 tile) from the S fragments, k16 slice kk2 = n tiles 2 kk2,
    // 2 kk2 + 1; each V fragment serves every m16 tile.
#pragma unroll
    for (int kk2 = 0; kk2 < BN / 16; ++kk2) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) pack_a<T>(a[mt], s[mt][2 * kk2], s[mt][2 * kk2 + 1]);
#pragma unroll
      for (int dd = 0; dd < HD / 16; ++dd) {
        uint32_t bfrag[4];
        ldsm_b_trans<LD>(bfrag, sV, kk2 * 16, dd * 16, lane);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<T>(acc[mt][2 * dd], a[mt], bfrag[0], bfrag[1]);
          mma_16816<T>(acc[mt][2 * dd + 1], a[mt], bfrag[2], bfrag[3]);
        }
      }
    }
  }

  // Epilogue: o = acc / l, lse = (m + log2 l) ln 2; rows with l = 0 (no key): o = 0, lse = -inf.
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
  float* lse = p.lse + (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = row_sum[mt][r];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const bool alive = sum > 0.0f;
      const float inv = alive ? 1.0f / sum : 0.0f;
      const int i = tile_row(mt) + g + 8 * r;
      if (i < p.len_q) {
        T* out_row = out + i * p.o_row_stride;
#pragma unroll
        for (int d = 0; d < kDTiles; ++d) {
          store_pair<T>(out_row, 8 * d + 2 * t, p.dim_v, acc[mt][d][2 * r] * inv, acc[mt][d][2 * r + 1] * inv,
                        p.pair_stores);
        }
        if (t == 0) lse[i] = alive ? (row_max[mt][r] + log2f(sum)) * kLn2 : -INFINITY;
      }
    }
  }
}

}  // namespace attention
}  // namespace fastformer
