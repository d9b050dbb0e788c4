// The PTX wrappers of csrc/attention/device.cuh, emulated for the CPU emulator (cuda_emulator.h),
// written from the PTX ISA's definitions, independently of the kernels' own comments:
//
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16x8) = A (16x16) B (16x8) + C. With
//     lane = 4 g + t: A register i holds two elements of row g + 8 (i % 2), columns
//     2t + 8 (i / 2) + {0, 1}; B register i holds rows (k) 2t + 8 i + {0, 1} of column g; C/D
//     element e is row g + 8 (e / 2), column 2t + e % 2. The lower-indexed element of a pair is in
//     the low 16 bits.
//   ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m .. 8m + 7 give the addresses of
//     the 8 rows (16 bytes each, 16-byte aligned) of matrix m; register m of lane L receives row
//     L / 4, elements 2 (L % 4) + {0, 1} of matrix m, or with .trans rows 2 (L % 4) + {0, 1},
//     element L / 4 (the transpose).
//   cp.async.{ca,cg}.shared.global [dst], [src], cp-size, src-size: copies src-size bytes and
//     zero-fills up to cp-size; lands when the thread's cp.async.wait_group lets its group complete.
//   ex2.approx.ftz.f32: 2^x (the emulator computes it exactly).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cuda_emulator.h"

namespace fastformer_emulator {

inline float bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline float element(uint32_t reg, int which, bool bf16) {
  return bits_to_float(static_cast<uint16_t>(which == 0 ? reg & 0xffffu : reg >> 16), bf16);
}

inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Block& b = block();
  b.warp_op(
      bf16 ? WarpOp::kMmaBF16 : WarpOp::kMmaF16,
      [&](Thread& th) {
        for (int i = 0; i < 4; ++i) th.in[i] = a[i], th.in_f[i] = c[i];
        th.in[4] = b0, th.in[5] = b1;
      },
      [bf16](Thread* lanes, int) {
        float A[16][16], B[16][8];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int i = 0; i < 4; ++i) {
            for (int half = 0; half < 2; ++half) {
              A[g + 8 * (i % 2)][2 * t + 8 * (i / 2) + half] = element(lanes[lane].in[i], half, bf16);
            }
          }
          for (int i = 0; i < 2; ++i) {
            for (int half = 0; half < 2; ++half) {
              B[2 * t + 8 * i + half][g] = element(lanes[lane].in[4 + i], half, bf16);
            }
          }
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int g = lane / 4, t = lane % 4;
          for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
            double sum = lanes[lane].in_f[e];
            for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row][k]) * B[k][col];
            lanes[lane].out_f[e] = static_cast<float>(sum);
          }
        }
      });
  for (int e = 0; e < 4; ++e) c[e] = b.thread().out_f[e];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  Block& b = block();
  const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
  b.warp_op(
      trans ? WarpOp::kLdmatrixTrans : WarpOp::kLdmatrix, [&](Thread& th) { th.in_ptr = smem; },
      [&b, trans, what](Thread* lanes, int warp) {
        uint16_t m[4][8][8];  // matrix, row, element
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const size_t offset = b.shared_offset(lanes[lane].in_ptr, 16, 16, what);
          b.record_read(offset, 16, warp, what);
          std::memcpy(m[lane / 8][lane % 8], lanes[lane].in_ptr, 16);
        }
        for (int lane = 0; lane < kWarpSize; ++lane) {
          const int row = lane / 4, pair = 2 * (lane % 4);
          for (int i = 0; i < 4; ++i) {
            const uint16_t lo = trans ? m[i][pair][row] : m[i][row][pair];
            const uint16_t hi = trans ? m[i][pair + 1][row] : m[i][row][pair + 1];
            lanes[lane].out[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
          }
        }
      });
  for (int i = 0; i < 4; ++i) r[i] = b.thread().out[i];
}

inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  Block& b = block();
  const char* what = bytes == 16 ? "cp.async (16 bytes)" : "cp.async (4 bytes)";
  if (src_bytes < 0 || src_bytes > bytes) b.fail(std::string(what) + ": src-size " + std::to_string(src_bytes));
  if (reinterpret_cast<uintptr_t>(src) % static_cast<uintptr_t>(bytes) != 0) {
    b.fail(std::string(what) + ": global source address not " + std::to_string(bytes) + "-byte aligned");
  }
  const size_t offset = b.shared_offset(dst, static_cast<size_t>(bytes), static_cast<size_t>(bytes), what);
  b.record_copy_issued(offset, static_cast<size_t>(bytes));
  b.thread().copies.push_back(AsyncCopy{static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src),
                                        bytes, src_bytes});
}

inline void cp_async_commit() {
  Thread& th = block().thread();
  th.group_ends.push_back(th.copies.size());
}

// Completes every committed group but the newest `pending`.
inline void cp_async_wait(int pending) {
  Block& b = block();
  Thread& th = b.thread();
  const int groups = static_cast<int>(th.group_ends.size());
  if (groups <= pending) return;
  const size_t done = th.group_ends[groups - 1 - pending];
  for (size_t i = 0; i < done; ++i) b.complete_copy(th.copies[i]);
  th.copies.erase(th.copies.begin(), th.copies.begin() + static_cast<std::ptrdiff_t>(done));
  th.group_ends.erase(th.group_ends.begin(), th.group_ends.begin() + (groups - pending));
  for (size_t& end : th.group_ends) end -= done;
}

}  // namespace fastformer_emulator

namespace fastformer {
namespace attention {

template <typename T>
inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value, "f16 or bf16 operands");
  ::fastformer_emulator::mma_16816(c, a, b0, b1, std::is_same<T, __nv_bfloat16>::value);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ::fastformer_emulator::ldmatrix_x4(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  ::fastformer_emulator::ldmatrix_x4(r, smem, true);
}
inline float fast_exp2(float x) { return std::exp2(x); }
inline void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  ::fastformer_emulator::cp_async(smem, gmem, 16, src_bytes);
}
inline void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  ::fastformer_emulator::cp_async(smem, gmem, 4, src_bytes);
}
inline void cp_async_commit() { ::fastformer_emulator::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  ::fastformer_emulator::cp_async_wait(N);
}

}  // namespace attention
}  // namespace fastformer
