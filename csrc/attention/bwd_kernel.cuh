// Attention backward (FlashAttention-2), two or three kernels:
//
//   preprocess:  delta_i = rowsum(dO_i * O_i)                       (float32, (B, Hq, Lq)); zeroes
//                the dQ sums of atomic dQ
//   dK/dV:       one CTA per (block of keys, key/value head, batch): 128 keys and 8 warps up to
//                head dim 64, else 64 and 4 (traits.h); loops over the query heads of its
//                key/value head (GQA: their contributions are summed in registers) and over their
//                query tiles; with atomic dQ (params.grad_q_sum set, the default) it also adds each
//                query tile's scale dS K into float32 sums with atomicAdd; with a float mask that
//                needs a gradient (params.grad_mask set; its own variant, kMaskGrad) it writes dS
//   dQ:          only without atomic dQ (torch.use_deterministic_algorithms(True)): one CTA per
//                (block of 64 query rows, query head, batch); loops over key tiles, recomputing S
//                and dP (two more products a score), no atomics: run-to-run identical gradients
//
// With s_ij and keep_ij as in the forward (scores.cuh; s in log2 units) and lse_i from it:
//   P_ij  = 2^(s_ij - lse_i log2 e)              (0 where masked, and on rows with lse = -inf)
//   Pd_ij = P_ij keep_ij / (1 - p)               (the probabilities that multiplied V)
//   dV    = Pd^T dO
//   dP_ij = (dO_i . v_j) keep_ij / (1 - p)
//   dS_ij = P_ij (dP_ij - delta_i)
//   dK    = scale dS^T Q,     dQ = scale dS K,     d attn_mask = dS (summed where it broadcasts)
//
// dK/dV kernel, warp w owns keys n0 + 16 w .. + 15 and works on transposed tiles, keys x queries:
//   S^T = K Q^T      A = K rows (ldsm_a),          B = Q as (k = d, n = query): ldsm_b on Q
//   dV += Pd^T dO    A = Pd^T from the S^T C fragments, B = dO as (k = query, n = d): ldsm_b_trans
//   dP^T = V dO^T    A = V rows (ldsm_a),          B = dO as (k = d, n = query): ldsm_b on dO
//   dK += dS^T Q     A = dS^T from C fragments,    B = Q as (k = query, n = d): ldsm_b_trans
// so P and dS stay in registers for dV and dK. With atomic dQ, dS^T goes to shared memory as T:
//   dQ += dS K       A = dS from dS^T (ldsm_a_trans), B = K as (k = key, n = d): ldsm_b_trans
// warp w taking query rows 16 (w % (BM / 16)) .. + 15 and a slice of the head dim (traits.h), and
// adding its fragment into grad_q_sum (float32 atomicAdd, scaled). Query tiles (Q, dO) are
// double-buffered with cp.async: tile it + 1 loads while tile it is used. lse and delta of the
// thread's query columns are read from global memory (L1/L2-resident, 2 x 2 x BM / 8 floats per
// thread per tile).
//
// dQ kernel, warp w owns query rows m0 + 16 w .. + 15:
//   S = Q K^T        (as the forward)
//   dP = dO V^T      A = dO rows (ldsm_a),          B = V as (k = d, n = key): ldsm_b on V
//   dQ += dS K       A = dS from C fragments,       B = K as (k = key, n = d): ldsm_b_trans
// with K and V tiles double-buffered.
//
// Causal: the dK/dV kernel starts at query n0 (queries before the key block see none of it), the
// dQ kernel stops at the block's diagonal, as the forward. Key blocks past the key length visit
// nothing and write zeros. The dropout keep bits of a tile are generated once into a bit mask
// (4 per n8 tile, at most 32) and used for both Pd and dP.
#pragma once

#include "attention/device.cuh"
#include "attention/params.h"
#include "attention/scores.cuh"
#include "attention/traits.h"

namespace fastformer {
namespace attention {

// delta = rowsum(dO * O), one warp per row of (B, Hq, Lq); with atomic dQ it also zeroes the row's
// float32 dQ sums (one launch fewer than a separate fill).
template <typename T>
__global__ void __launch_bounds__(32 * kPreprocessRowsPerCta)
    attention_bwd_preprocess_kernel(const AttentionBwdParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads_q * p.len_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int i = static_cast<int>(row % p.len_q);
  const int64_t bh = row / p.len_q;
  const int h = static_cast<int>(bh % p.heads_q);
  const int b = static_cast<int>(bh / p.heads_q);
  const T* o = static_cast<const T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
  const T* d = static_cast<const T*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride +
               i * p.do_row_stride;
  float sum = 0.0f;
  for (int c = lane; c < p.dim_v; c += 32) sum += static_cast<float>(o[c]) * static_cast<float>(d[c]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) p.delta[row] = sum;
  if (p.grad_q_sum != nullptr) {
    float* sums = p.grad_q_sum + b * p.dqs_batch_stride + h * p.dqs_head_stride + i * p.dqs_row_stride;
    for (int c = lane; c < p.dim; c += 32) sums[c] = 0.0f;
  }
}

// lse in log2 units for P = 2^(s - lse2); +inf (P = 0) past the last row or where lse = -inf.
__device__ __forceinline__ float lse_log2(const float* lse, int i, int len_q) {
  const float l = i < len_q ? lse[i] : -INFINITY;
  return l == -INFINITY ? INFINITY : l * kLog2e;
}

// d attn_mask = dS (the mask is added to the scaled scores), for one warp's tile of dS^T: its 16
// keys x kMTiles * 8 queries from m0, element e of tile n at key keys[e / 2], query m0 + 8 n + 2 t
// + e % 2 (as S^T in the dK/dV kernel). Stored where grad_mask has the full shape; added with
// atomics where it broadcasts, and where it broadcasts over the queries (a per-key bias) summed
// over the tile's queries first (registers, then the quad's lanes): one add per key and warp.
// Scores past Lq or Lk are left out. Every lane of the warp must call it (shuffles).
template <int kMTiles>
__device__ __forceinline__ void write_mask_grad(const AttentionBwdParams& p, int b, int h, int m0,
                                                const int (&keys)[2], const float (&ds_t)[kMTiles][4], int t) {
  float* grad = p.grad_mask + b * p.dm_batch_stride + h * p.dm_head_stride;
  if (p.grad_mask_atomic && p.dm_row_stride == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          if (m0 + 8 * n + 2 * t + c < p.len_q) sum += ds_t[n][2 * r + c];
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      if (t == 0 && keys[r] < p.len_k && sum != 0.0f) atomicAdd(grad + keys[r] * p.dm_col_stride, sum);
    }
    return;
  }
  // Row offsets stepped by adds: 64-bit products of each element's own indices spilled 16 bytes
  // at head dim 64 (ptxas, sm_90a).
  float* key_cols[2] = {grad + keys[0] * p.dm_col_stride, grad + keys[1] * p.dm_col_stride};
  const int64_t rows8 = 8 * p.dm_row_stride;
  int64_t row = (m0 + 2 * t) * p.dm_row_stride;
#pragma unroll
  for (int n = 0; n < kMTiles; ++n, row += rows8) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = m0 + 8 * n + 2 * t + c;
      if (i >= p.len_q) continue;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (keys[r] >= p.len_k) continue;
        float* at = key_cols[r] + row + c * p.dm_row_stride;
        const float ds = ds_t[n][2 * r + c];
        if (!p.grad_mask_atomic) {
          *at = ds;
        } else if (ds != 0.0f) {  // masked scores (P = 0) add nothing
          atomicAdd(at, ds);
        }
      }
    }
  }
}

// kMaskGrad (only with kGeneral: a float mask): also writes the mask's gradient (write_mask_grad).
template <typename Tr, bool kGeneral, bool kMaskGrad = false>
__global__ void __launch_bounds__(Tr::kBwdKvThreads) attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using T = typename Tr::Element;
  constexpr int BN = Tr::kBwdKvBlockN, BM = Tr::kBwdKvBlockM, HD = Tr::kHeadDim, LD = Tr::kSmemStride;
  constexpr int kThreads = Tr::kBwdKvThreads;
  constexpr int kMTiles = BM / 8;  // n8 tiles of S^T (its columns are queries)
  constexpr int kDTiles = HD / 8;
  constexpr int LDS = Tr::kBwdDsStride, kDqCols = Tr::kBwdDqCols;
  static_assert(kMTiles * 4 <= 32, "the keep bits of a tile fit in one uint32");
  static_assert(kGeneral || !kMaskGrad, "a mask gradient needs the variant that reads the mask");
  T* sK = reinterpret_cast<T*>(dynamic_shared_memory());
  T* sV = sK + BN * LD;
  T* sQ = sV + BN * LD;       // two buffers of BM rows
  T* sdO = sQ + 2 * BM * LD;  // two buffers of BM rows
  T* sdS = sdO + 2 * BM * LD;  // with atomic dQ: dS^T, BN rows of LDS
  const bool atomic_dq = p.grad_q_sum != nullptr;

  const GridPlace place = grid_place(p.len_k, BN, p.heads_k);
  const int n0 = place.block * BN;
  const int hk = place.head;
  const int b = place.batch;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int dq_tile = warp % Tr::kBwdDqRowTiles, dq_col0 = (warp / Tr::kBwdDqRowTiles) * kDqCols;

  const int key_len = key_length(p, b);
  const int m_begin = p.is_causal ? n0 : 0;  // queries i < n0 see none of keys n0..
  const int m_end = n0 < key_len ? p.len_q : 0;
  const int m_tiles = m_end > m_begin ? (m_end - m_begin + BM - 1) / BM : 0;
  const int total = p.group * m_tiles;  // (query head of the group, query tile) pairs

  // Q and dO of step `it` (query head hk * group + it / m_tiles, tile it % m_tiles) into buffer buf.
  auto load_q_do = [&](int it, int buf) {
    const int h = hk * p.group + it / m_tiles;
    const int m0 = m_begin + (it % m_tiles) * BM;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    const T* d = static_cast<const T*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride +
                 m0 * p.do_row_stride;
    load_tile<BM, HD, LD, kThreads>(sQ + buf * BM * LD, q, p.q_row_stride, p.len_q - m0, p.dim, p.load_bytes);
    load_tile<BM, HD, LD, kThreads>(sdO + buf * BM * LD, d, p.do_row_stride, p.len_q - m0, p.dim_v,
                                    p.load_bytes);
  };

  float acc_dk[kDTiles][4], acc_dv[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[d][e] = acc_dv[d][e] = 0.0f;
  }
  const int keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};  // rows g, g + 8 of the warp
  // 0, or -inf for keys past the key end: all the mask those keys need on tiles that need no other
  // (rows past Lq need none: lse_log2 makes their P 0).
  const float key_bias[2] = {keys[0] < key_len ? 0.0f : -INFINITY, keys[1] < key_len ? 0.0f : -INFINITY};

  if (total > 0) {
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + n0 * p.k_row_stride;
    const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + n0 * p.v_row_stride;
    load_tile<BN, HD, LD, kThreads>(sK, k, p.k_row_stride, key_len - n0, p.dim, p.load_bytes);
    load_tile<BN, HD, LD, kThreads>(sV, v, p.v_row_stride, key_len - n0, p.dim_v, p.load_bytes);
    load_q_do(0, 0);
    cp_async_commit();
  }

  for (int it = 0; it < total; ++it) {
    if (it + 1 < total) {
      load_q_do(it + 1, (it + 1) % 2);  // its buffer was last read in step it - 1 (synced below)
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // tile it visible to every warp

    const int h = hk * p.group + it / m_tiles;
    const int m0 = m_begin + (it % m_tiles) * BM;
    const T* sQb = sQ + (it % 2) * BM * LD;
    const T* sdOb = sdO + (it % 2) * BM * LD;
    const ScoreRules rules(p, b, h, key_len);
    const int64_t row_base = (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q;

    // S^T = K Q^T: the warp's 16 keys x BM queries. Element e of tile n: key keys[e / 2],
    // query m0 + 8 n + 2 t + e % 2.
    float st[kMTiles][4];
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = 0.0f;
    mma_rows_by_rows<T, LD, HD, BM>(st, sK, warp * 16, sQb, lane);

    // P^T (in place) and the keep bits; keys past the key end are masked by key_bias alone.
    const bool need_mask =
        (kGeneral && rules.has_attn_mask()) || rules.has_padding_holes() || (p.is_causal && n0 + BN - 1 > m0);
    const bool dropout = kGeneral && p.has_dropout;
    const uint32_t keep = dropout ? rules.keep_bits_transposed<kMTiles>(m0 + 2 * t, keys[0]) : 0u;
    uint32_t keep_bits = dropout ? 0u : 0xffffffffu;  // keep, less the scores past Lq / Lk
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = m0 + 8 * n + 2 * t + c;
        const float l2 = lse_log2(p.lse + row_base, i, p.len_q);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + c;
          const float s =
              need_mask ? rules.score<kGeneral>(st[n][e], i, keys[r]) : fmaf(st[n][e], p.scale_log2, key_bias[r]);
          st[n][e] = fast_exp2(s - l2);
          const uint32_t bit = 1u << (4 * n + e);
          if (dropout && i < p.len_q && keys[r] < p.len_k && (keep & bit)) keep_bits |= bit;
        }
      }
    }

    // dV += Pd^T dO: k16 slice kk2 of the queries = S^T tiles 2 kk2, 2 kk2 + 1.
#pragma unroll
    for (int kk2 = 0; kk2 < BM / 16; ++kk2) {
      float pd[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int n = 2 * kk2 + half;
          pd[half][e] = dropout ? ((keep_bits >> (4 * n + e)) & 1u ? st[n][e] * p.dropout_scale : 0.0f) : st[n][e];
        }
      }
      uint32_t a[4];
      pack_a<T>(a, pd[0], pd[1]);
      mma_fragment_by_rows<T, LD, HD>(acc_dv, a, sdOb, kk2 * 16, 0, lane);
    }

    // dP^T = V dO^T: the warp's 16 keys x BM queries.
    float dpt[kMTiles][4];
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.0f;
    mma_rows_by_rows<T, LD, HD, BM>(dpt, sV, warp * 16, sdOb, lane);

    // dS^T = P^T (dP^T keep / (1 - p) - delta), in place of dP^T.
#pragma unroll
    for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int i = m0 + 8 * n + 2 * t + c;
        const float delta = i < p.len_q ? p.delta[row_base + i] : 0.0f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + c;
          float dp = dpt[n][e];
          if (dropout) dp = (keep_bits >> (4 * n + e)) & 1u ? dp * p.dropout_scale : 0.0f;
          dpt[n][e] = st[n][e] * (dp - delta);
        }
      }
    }

    if constexpr (kMaskGrad) write_mask_grad<kMTiles>(p, b, h, m0, keys, dpt, t);

    // dK += dS^T Q.
#pragma unroll
    for (int kk2 = 0; kk2 < BM / 16; ++kk2) {
      uint32_t a[4];
      pack_a<T>(a, dpt[2 * kk2], dpt[2 * kk2 + 1]);
      mma_fragment_by_rows<T, LD, HD>(acc_dk, a, sQb, kk2 * 16, 0, lane);
    }

    if (atomic_dq) {
      // dS^T into shared memory as T (the values dK used), each warp its 16 key rows: the C
      // fragments' pairs, 32-bit stores, conflict-free (rows of kBwdDsStride elements).
#pragma unroll
      for (int n = 0; n < kMTiles; ++n) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          T* pair = sdS + (warp * 16 + g + 8 * r) * LDS + 8 * n + 2 * t;
          *reinterpret_cast<uint32_t*>(pair) = pack2<T>(dpt[n][2 * r], dpt[n][2 * r + 1]);
        }
      }
      __syncthreads();  // dS^T complete
      // dQ tile (m16 tile dq_tile of the queries, head-dim columns dq_col0 ..) = dS K over the
      // CTA's keys: A = dS from dS^T (ldsm_a_trans), B = K as (k = key, n = d) (ldsm_b_trans).
      float dq[kDqCols / 8][4];
#pragma unroll
      for (int d = 0; d < kDqCols / 8; ++d) dq[d][0] = dq[d][1] = dq[d][2] = dq[d][3] = 0.0f;
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t a[4];
        ldsm_a_trans<LDS>(a, sdS, kk * 16, dq_tile * 16, lane);
        mma_fragment_by_rows<T, LD, kDqCols>(dq, a, sK, kk * 16, dq_col0, lane);
      }
      float* sums = p.grad_q_sum + b * p.dqs_batch_stride + h * p.dqs_head_stride;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = m0 + dq_tile * 16 + g + 8 * r;
        if (i >= p.len_q) continue;
        float* row = sums + i * p.dqs_row_stride;
#pragma unroll
        for (int d = 0; d < kDqCols / 8; ++d) {
          const int col = dq_col0 + 8 * d + 2 * t;
          const float x = dq[d][2 * r] * p.scale, y = dq[d][2 * r + 1] * p.scale;
          if (p.pair_atomics && col + 1 < p.dim) {
            atomic_add_pair(row + col, x, y);
          } else {
            if (col < p.dim) atomicAdd(row + col, x);
            if (col + 1 < p.dim) atomicAdd(row + col + 1, y);
          }
        }
      }
    }
    __syncthreads();  // every warp is done with buffer it % 2 (and dS^T) before step it + 1 refills it
  }

  // Epilogue: rows = keys (zeros for keys no query saw), dK scaled.
  T* dk = static_cast<T*>(p.grad_k) + b * p.dk_batch_stride + hk * p.dk_head_stride;
  T* dv = static_cast<T*>(p.grad_v) + b * p.dv_batch_stride + hk * p.dv_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = keys[r];
    if (j >= p.len_k) continue;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      store_pair<T>(dk + j * p.dk_row_stride, 8 * d + 2 * t, p.dim, acc_dk[d][2 * r] * p.scale,
                    acc_dk[d][2 * r + 1] * p.scale, p.pair_stores);
      store_pair<T>(dv + j * p.dv_row_stride, 8 * d + 2 * t, p.dim_v, acc_dv[d][2 * r], acc_dv[d][2 * r + 1],
                    p.pair_stores);
    }
  }
}

template <typename Tr, bool kGeneral>
__global__ void __launch_bounds__(Tr::kThreads) attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using T = typename Tr::Element;
  constexpr int BM = Tr::kBwdQBlockM, BN = Tr::kBwdQBlockN, HD = Tr::kHeadDim, LD = Tr::kSmemStride;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kNTiles = BN / 8;
  constexpr int kDTiles = HD / 8;
  static_assert(kNTiles * 4 <= 32, "the keep bits of a tile fit in one uint32");
  T* sQ = reinterpret_cast<T*>(dynamic_shared_memory());
  T* sdO = sQ + BM * LD;
  T* sK = sdO + BM * LD;      // two buffers of BN rows
  T* sV = sK + 2 * BN * LD;   // two buffers of BN rows

  const GridPlace place = grid_place(p.len_q, BM, p.heads_q);
  const int m0 = place.block * BM;
  const int h = place.head;
  const int b = place.batch;
  const int hk = h / p.group;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;

  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const int key_len = key_length(p, b);
  int n_end = key_len;
  if (p.is_causal) n_end = min(n_end, m0 + BM);
  const int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN : 0;
  const ScoreRules rules(p, b, h, key_len);
  const int64_t row_base = (static_cast<int64_t>(b) * p.heads_q + h) * p.len_q;

  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  float l2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l2[r] = lse_log2(p.lse + row_base, rows[r], p.len_q);
    delta[r] = rows[r] < p.len_q ? p.delta[row_base + rows[r]] : 0.0f;
  }

  auto load_k_v = [&](int j, int buf) {
    const int n0 = j * BN;
    load_tile<BN, HD, LD, kThreads>(sK + buf * BN * LD, k + n0 * p.k_row_stride, p.k_row_stride, key_len - n0,
                                    p.dim, p.load_bytes);
    load_tile<BN, HD, LD, kThreads>(sV + buf * BN * LD, v + n0 * p.v_row_stride, p.v_row_stride, key_len - n0,
                                    p.dim_v, p.load_bytes);
  };

  float acc[kDTiles][4];
#pragma unroll
  for (int d = 0; d < kDTiles; ++d) acc[d][0] = acc[d][1] = acc[d][2] = acc[d][3] = 0.0f;

  if (n_tiles > 0) {
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    const T* d = static_cast<const T*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride +
                 m0 * p.do_row_stride;
    load_tile<BM, HD, LD, kThreads>(sQ, q, p.q_row_stride, p.len_q - m0, p.dim, p.load_bytes);
    load_tile<BM, HD, LD, kThreads>(sdO, d, p.do_row_stride, p.len_q - m0, p.dim_v, p.load_bytes);
    load_k_v(0, 0);
    cp_async_commit();
  }

  for (int j = 0; j < n_tiles; ++j) {
    if (j + 1 < n_tiles) {
      load_k_v(j + 1, (j + 1) % 2);  // its buffer was last read in step j - 1 (synced below)
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int n0 = j * BN;
    const T* sKb = sK + (j % 2) * BN * LD;
    const T* sVb = sV + (j % 2) * BN * LD;

    // S = Q K^T; element e of tile n: row rows[e / 2], key n0 + 8 n + 2 t + e % 2.
    float s[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    mma_rows_by_rows<T, LD, HD, BN>(s, sQ, warp * 16, sKb, lane);

    // P (in place) and the keep bits. Unlike the other two kernels, every tile of the general variant
    // is masked: skipping the mask under dropout alone took 168 -> 228 registers at head dim 64.
    const bool need_mask =
        kGeneral || rules.has_padding_holes() || n0 + BN > key_len || (p.is_causal && n0 + BN - 1 > m0);
    const bool dropout = kGeneral && p.has_dropout;
    const uint32_t keep = dropout ? rules.keep_bits<kNTiles>(rows[0], n0 + 2 * t) : 0u;
    uint32_t keep_bits = dropout ? 0u : 0xffffffffu;  // keep, less the scores past Lq / Lk
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = rows[e / 2], jj = n0 + 8 * n + 2 * t + e % 2;
        const float sc = need_mask ? rules.score<kGeneral>(s[n][e], i, jj) : s[n][e] * p.scale_log2;
        s[n][e] = fast_exp2(sc - l2[e / 2]);
        const uint32_t bit = 1u << (4 * n + e);
        if (dropout && i < p.len_q && jj < p.len_k && (keep & bit)) keep_bits |= bit;
      }
    }

    // dP = dO V^T
    float dp[kNTiles][4];
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.0f;
    mma_rows_by_rows<T, LD, HD, BN>(dp, sdO, warp * 16, sVb, lane);

    // dS = P (dP keep / (1 - p) - delta), in place of dP.
#pragma unroll
    for (int n = 0; n < kNTiles; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = dp[n][e];
        if (dropout) x = (keep_bits >> (4 * n + e)) & 1u ? x * p.dropout_scale : 0.0f;
        dp[n][e] = s[n][e] * (x - delta[e / 2]);
      }
    }

    // dQ += dS K
#pragma unroll
    for (int kk2 = 0; kk2 < BN / 16; ++kk2) {
      uint32_t a[4];
      pack_a<T>(a, dp[2 * kk2], dp[2 * kk2 + 1]);
      mma_fragment_by_rows<T, LD, HD>(acc, a, sKb, kk2 * 16, 0, lane);
    }
    __syncthreads();  // every warp is done with buffer j % 2 before step j + 1 refills it
  }

  T* dq = static_cast<T*>(p.grad_q) + b * p.dq_batch_stride + h * p.dq_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.len_q) continue;
    T* row = dq + rows[r] * p.dq_row_stride;
#pragma unroll
    for (int d = 0; d < kDTiles; ++d) {
      store_pair<T>(row, 8 * d + 2 * t, p.dim, acc[d][2 * r] * p.scale, acc[d][2 * r + 1] * p.scale,
                    p.pair_stores);
    }
  }
}

}  // namespace attention
}  // namespace fastformer
