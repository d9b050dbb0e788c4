// Compile-time shape of the attention kernels for one (head dim, element type).
//
// Every kernel runs kWarps = 4 warps; each warp owns 16 rows (the M of one mma.sync m16n8k16) or,
// in the forward up to head dim 64, 32 rows (kFwdMTiles = 2 m16 tiles) of the tile it holds:
//   forward:  128 query rows per CTA up to head dim 64, else 64; key/value tiles of kBlockN = 64
//             keys streamed.
//   dK/dV:    16 keys per warp, 128 keys per CTA of 8 warps up to head dim 64 (as FlashAttention-2),
//             else 64 per CTA of 4; query tiles of kBwdKvBlockM streamed, over every query head of
//             the key/value head (GQA).
//   dQ:       64 query rows per CTA, key/value tiles of kBwdQBlockN streamed.
// Why 128 keys a dK/dV CTA: each streamed Q / dO tile then serves twice the keys, and each dQ
// element takes Lk / 128 atomic adds instead of Lk / 64 (registers per thread are the same: a warp
// still holds 16 keys). Above head dim 64 the shared memory would pass 99 KiB.
// Why two m16 tiles a warp in the forward: a K or V fragment a warp reads from shared memory
// (ldmatrix.x4: 512 bytes, 4 cycles of an SM's 128 bytes a cycle) feeds two mma.sync m16n8k16 per
// m16 tile (2 cycles each on sm_80's 2048 FLOP a cycle per SM, fewer on sm_90). With one tile a
// warp the products wait on shared memory; with two they do not (FlashAttention-2 holds 128 query
// rows with 4 warps too). Above head dim 64 the second tile's accumulator does not fit in registers,
// and the streamed tile of the backward kernels is 32 rows, so that the two float32 score tiles
// (S and dP) and the two head-dim-wide accumulators fit.
//
// Shared memory rows hold kHeadDim elements plus 8 of padding (16 bytes): a row is then an odd
// number of 16-byte chunks (HD/8 + 1 = 5, 9, 13, 17), so the 8 row addresses of one ldmatrix
// 8x8 matrix, or of 8 consecutive cp.async chunks down a column, fall in 8 different 16-byte
// bank groups: no bank conflicts, without a swizzle.
#pragma once

#include "attention/launch.h"  // kMinRowsPerCta

namespace fastformer {
namespace attention {

template <int kHeadDim_, typename Element_>
struct AttentionTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRowsPerWarp = 16;
  static constexpr int kSmemStride = kHeadDim + 8;  // elements per shared-memory row

  // forward
  static constexpr int kFwdMTiles = kHeadDim <= 64 ? 2 : 1;  // m16 tiles of query rows a warp
  static constexpr int kFwdRowsPerWarp = kRowsPerWarp * kFwdMTiles;
  static constexpr int kBlockM = kFwdRowsPerWarp * kWarps;
  static constexpr int kBlockN = 64;
  // backward, dK/dV kernel (keys held, queries streamed): up to head dim 64, 8 warps, 128 keys
  static constexpr int kBwdKvWarps = kHeadDim <= 64 ? 8 : 4;
  static constexpr int kBwdKvThreads = 32 * kBwdKvWarps;
  static constexpr int kBwdKvBlockN = kRowsPerWarp * kBwdKvWarps;
  static constexpr int kBwdKvBlockM = kHeadDim <= 64 ? 64 : 32;
  // backward, dQ kernel (queries held, keys streamed)
  static constexpr int kBwdQBlockM = kRowsPerWarp * kWarps;
  static constexpr int kBwdQBlockN = kHeadDim <= 64 ? 64 : 32;

  static constexpr int kElementBytes = 2;
  // forward: Q, K, V tiles (one buffer each: K and V loads interleave, see the kernel)
  static constexpr int kFwdSmemBytes = (kBlockM + 2 * kBlockN) * kSmemStride * kElementBytes;
  // dK/dV: K, V, and two buffers each of Q and dO
  static constexpr int kBwdKvSmemBytes = (2 * kBwdKvBlockN + 4 * kBwdKvBlockM) * kSmemStride * kElementBytes;
  // dK/dV with atomic dQ: also dS^T (keys x queries) for the dS K product, rows of BM + 8 elements
  // (an odd number of 16-byte chunks, as kSmemStride). Each warp takes one m16 tile of the query
  // rows and kBwdDqCols of the head dim.
  static constexpr int kBwdDsStride = kBwdKvBlockM + 8;
  static constexpr int kBwdDsSmemBytes = kBwdKvBlockN * kBwdDsStride * kElementBytes;
  static constexpr int kBwdDqRowTiles = kBwdKvBlockM / 16;
  static constexpr int kBwdDqCols = kHeadDim * kBwdDqRowTiles / kBwdKvWarps;
  // dQ: Q, dO, and two buffers each of K and V
  static constexpr int kBwdQSmemBytes = (2 * kBwdQBlockM + 4 * kBwdQBlockN) * kSmemStride * kElementBytes;

  static_assert(sizeof(Element) == kElementBytes, "16-bit elements only (half, bfloat16)");
  static_assert(kHeadDim % 16 == 0 && kHeadDim >= 32 && kHeadDim <= 128,
                "head dim: a multiple of 16 (the k of m16n8k16) in 32..128");
  static_assert(kBlockM >= kMinRowsPerCta && kBwdKvBlockN >= kMinRowsPerCta && kBwdQBlockM >= kMinRowsPerCta,
                "the grid-size check (attention_ops.cpp) counts at least kMinRowsPerCta rows per CTA");
  static_assert(kBlockN % 16 == 0 && kBwdKvBlockM % 16 == 0 && kBwdQBlockN % 16 == 0,
                "streamed tiles are whole k16 slices of the P.V / dS.K / P^T.dO products");
  static_assert(kSmemStride % 8 == 0 && (kSmemStride / 8) % 2 == 1,
                "shared rows: whole 16-byte chunks, an odd number of them (conflict-free ldmatrix)");
  // The tile loader hands out 16-byte chunks round-robin: every thread gets the same number.
  static_assert((kBlockN * kHeadDim / 8) % kThreads == 0, "forward tile loads");
  static_assert((kBwdKvBlockM * kHeadDim / 8) % kBwdKvThreads == 0 &&
                    (kBwdKvBlockN * kHeadDim / 8) % kBwdKvThreads == 0,
                "dK/dV tile loads");
  static_assert((kBwdQBlockN * kHeadDim / 8) % kThreads == 0, "dQ tile loads");
  static_assert(kBwdDsStride % 8 == 0 && (kBwdDsStride / 8) % 2 == 1, "dS^T rows: as kSmemStride");
  static_assert(kBwdKvWarps % kBwdDqRowTiles == 0 && kBwdDqCols % 16 == 0,
                "atomic dQ: the warps split the query tiles and the head dim into whole n16 slices");
  static_assert(kFwdSmemBytes <= 99 * 1024 && kBwdKvSmemBytes + kBwdDsSmemBytes <= 99 * 1024 &&
                    kBwdQSmemBytes <= 99 * 1024,
                "shared memory within what every sm_8x/sm_90 GPU grants one block (99 KiB)");
};

}  // namespace attention
}  // namespace fastformer
