// Device building blocks of the attention kernels: tensor-core MMA, ldmatrix, cp.async, exp2,
// and the cooperative tile loader. Inline PTX, sm_80+ (also what sm_90 runs for these kernels).
//
// Fragment layouts of mma.sync.m16n8k16.row.col (PTX ISA, "Matrix fragments for mma.m16n8k16"),
// with lane = threadIdx.x % 32, g = lane / 4 (the "group"), t = lane % 4 (thread in group):
//   A (16 x 16, row major, 4 x .b32 = 8 halves):
//     a0: (row g,     cols 2t, 2t+1)     a1: (row g + 8, cols 2t, 2t+1)
//     a2: (row g,     cols 2t+8, 2t+9)   a3: (row g + 8, cols 2t+8, 2t+9)
//   B (16 x 8, k x n, "col": each column contiguous in k; 2 x .b32):
//     b0: (k 2t, 2t+1, col g)            b1: (k 2t+8, 2t+9, col g)
//   C/D (16 x 8 float32, 4 registers):
//     c0, c1: (row g, cols 2t, 2t+1)     c2, c3: (row g + 8, cols 2t, 2t+1)
//   In each .b32 the lower-indexed element sits in the low 16 bits.
// So a row of C is spread over the 4 threads of a quad (same g), which is why row reductions
// (softmax max and sum) are two __shfl_xor_sync steps (xor 1, xor 2). And the C fragments of two
// n8 tiles side by side (cols 0..7 and 8..15) are exactly the A fragment of a k16 slice:
//   a0 = pack(C[j][0], C[j][1]), a1 = pack(C[j][2], C[j][3]),
//   a2 = pack(C[j+1][0], C[j+1][1]), a3 = pack(C[j+1][2], C[j+1][3]),
// which is how P and dS go from one product into the next without shared memory.
//
// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i (16 bytes each); register i of every lane receives matrix i. Without .trans lane
// L gets (row L/4, cols 2(L%4), 2(L%4)+1) of its matrix, i.e. (row g, cols 2t, 2t+1); with .trans
// it gets (rows 2t, 2t+1, col g), the transpose. Hence, for a tile stored row-major in shared
// memory (rows x cols, row stride kSmemStride):
//   * A fragment of rows r0..r0+15, cols c0..c0+15 (no .trans): lane L points at
//     row r0 + L % 16, col c0 + (L / 16) * 8  -> matrices (r0, c0), (r0+8, c0), (r0, c0+8),
//     (r0+8, c0+8) = a0, a1, a2, a3.                                       [ldsm_a]
//   * B fragments when the stored rows are the n index and the columns the k index (K in
//     Q K^T): lane L points at row n0 + L % 8 + (L / 16) * 8, col k0 + ((L / 8) % 2) * 8
//     -> matrices (n0, k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8) = (b0, b1) of n tile n0 and
//     (b0, b1) of n tile n0 + 8.                                            [ldsm_b]
//   * B fragments when the stored rows are the k index and the columns the n index (V in P V),
//     with .trans: lane L points at row k0 + L % 8 + ((L / 8) % 2) * 8, col n0 + (L / 16) * 8
//     -> matrices (k0, n0), (k0+8, n0), (k0, n0+8), (k0+8, n0+8), transposed = (b0, b1) of
//     n tile n0 and (b0, b1) of n tile n0 + 8.                              [ldsm_b_trans]
//   * A fragment of rows m0..m0+15, cols k0..k0+15 from its transpose stored row-major (rows k,
//     cols m; dS^T in the dK/dV kernel), with .trans: lanes address as ldsm_b does, rows k0 + L % 8
//     + (L / 16) * 8, col m0 + ((L / 8) % 2) * 8 -> matrices (k0, m0), (k0, m0+8), (k0+8, m0),
//     (k0+8, m0+8), transposed = a0, a1, a2, a3.                            [ldsm_a_trans]
//
// The PTX wrappers (mma_16816, ldmatrix_x4[_trans], fast_exp2, cp_async_*) are the only inline
// assembly of the kernels; the tests' CPU emulator (FASTFORMER_CPU_EMULATION, tests/cuda_emulator)
// supplies the same functions, emulated from the PTX ISA's definitions, in cuda_emulator_ptx.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/kernel_runtime.cuh"
#if defined(FASTFORMER_CPU_EMULATION)
#include "cuda_emulator_ptx.h"  // the PTX wrappers below, emulated
#endif

namespace fastformer {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A CTA's (row block, head, batch) on the flat grid of flat_grid_ctas(rows, rows_per_cta, heads, batch) CTAs
// (launch.h): blocks vary fastest, then heads, then the batch, the order in which a (blocks,
// heads, batch) grid runs, so that CTAs reading the same K/V still run together.
struct GridPlace {
  int block, head, batch;
};
__device__ __forceinline__ GridPlace grid_place(int rows, int rows_per_cta, int heads) {
  const int blocks = (rows + rows_per_cta - 1) / rows_per_cta;
  const int cta = static_cast<int>(blockIdx.x);
  const int head_batch = cta / blocks;
  return {cta % blocks, head_batch % heads, head_batch / heads};
}

#if !defined(FASTFORMER_CPU_EMULATION)
__device__ __forceinline__ uint32_t smem_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// D += A B, float32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
}

// 2^x (MUFU.EX2); exp2(-inf) = +0, so masked scores (-inf) become probability 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16-byte asynchronous global -> shared copy; the bytes past `src_bytes` (0..16) are zero-filled
// and not read, so a partial chunk at the head-dim edge or a row past the sequence end costs no
// out-of-bounds read.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
}
// The same with 4 bytes (two elements; `src_bytes` 0, 2 or 4), for rows aligned to 4 bytes only.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif  // !FASTFORMER_CPU_EMULATION

// The four ldmatrix patterns of the header comment. `tile` is the shared tile (row stride LD
// elements); r0/c0 etc. are the fragment's origin in it.
template <int LD, typename T>
__device__ __forceinline__ void ldsm_a(uint32_t (&a)[4], const T* tile, int r0, int c0, int lane) {
  ldmatrix_x4(a, tile + (r0 + (lane % 16)) * LD + c0 + (lane / 16) * 8);
}
template <int LD, typename T>
__device__ __forceinline__ void ldsm_b(uint32_t (&b)[4], const T* tile, int n0, int k0, int lane) {
  ldmatrix_x4(b, tile + (n0 + (lane % 8) + (lane / 16) * 8) * LD + k0 + ((lane / 8) % 2) * 8);
}
template <int LD, typename T>
__device__ __forceinline__ void ldsm_b_trans(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  ldmatrix_x4_trans(b, tile + (k0 + (lane % 8) + ((lane / 8) % 2) * 8) * LD + n0 + (lane / 16) * 8);
}
template <int LD, typename T>
__device__ __forceinline__ void ldsm_a_trans(uint32_t (&a)[4], const T* tile_t, int k0, int m0, int lane) {
  ldmatrix_x4_trans(a, tile_t + (k0 + (lane % 8) + (lane / 16) * 8) * LD + m0 + ((lane / 8) % 2) * 8);
}

// address[0] += x, address[1] += y in global memory, atomically; address 8-byte aligned. sm_90 adds
// the pair with one vector reduction (red.global.add.v2.f32: one instruction, one L2 operation),
// earlier archs one by one. The CPU emulator takes the vector path (it checks the alignment).
__device__ __forceinline__ void atomic_add_pair(float* address, float x, float y) {
#if defined(FASTFORMER_CPU_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900)
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(x, y));
#else
  atomicAdd(address, x);
  atomicAdd(address + 1, y);
#endif
}

// Two floats -> one .b32 of two 16-bit elements (x in the low half: the lower column index).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float x, float y);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float x, float y) {
  __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float x, float y) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<uint32_t*>(&h);
}

// The A fragment of a k16 slice from the C fragments of two n8 tiles side by side (lo: columns
// 0..7 of the slice, hi: 8..15), rounded to T: how P and dS feed the next product (header comment).
template <typename T>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// Warp products over shared tiles of row stride LD, accumulated into the n8 C tiles of acc.
// acc += A B^T for the 16 rows of sA from a_row and the first N rows of sB, both over K columns
// (S = Q K^T with Q in sA and K in sB: B read with ldsm_b).
template <typename T, int LD, int K, int N>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[N / 8][4], const T* sA, int a_row, const T* sB,
                                                 int lane) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    ldsm_a<LD>(a, sA, a_row, kk * 16, lane);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];
      ldsm_b<LD>(b, sB, nn * 16, kk * 16, lane);
      mma_16816<T>(acc[2 * nn], a, b[0], b[1]);
      mma_16816<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc += a B for an A fragment (16 x k16) and the 16 rows of sB from k_row, columns col0 ..
// col0 + N - 1 (P V with P in registers and V in sB: B read with ldsm_b_trans).
template <typename T, int LD, int N>
__device__ __forceinline__ void mma_fragment_by_rows(float (&acc)[N / 8][4], const uint32_t (&a)[4], const T* sB,
                                                     int k_row, int col0, int lane) {
#pragma unroll
  for (int dd = 0; dd < N / 16; ++dd) {
    uint32_t b[4];
    ldsm_b_trans<LD>(b, sB, k_row, col0 + dd * 16, lane);
    mma_16816<T>(acc[2 * dd], a, b[0], b[1]);
    mma_16816<T>(acc[2 * dd + 1], a, b[2], b[3]);
  }
}

// Cooperative load of a ROWS x HD tile (row stride `row_stride` elements in global memory) into
// shared memory rows of LD elements: rows >= rows_valid and columns >= cols_valid are zero.
// Work is handed out in 16-byte chunks (8 elements), chunk c -> row c / (HD/8), col (c % (HD/8)) * 8;
// consecutive threads take consecutive chunks of a row (coalesced global reads).
// vector: 16-byte cp.async (asynchronous: the caller commits and waits); otherwise element-wise
// loads stored synchronously (rows or the base not 16-byte aligned).
template <int ROWS, int HD, int LD, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int rows_valid,
                                          int cols_valid, int load_bytes) {
  constexpr int kChunksPerRow = HD / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % THREADS == 0, "every thread loads the same number of chunks");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int chunk = i * THREADS + static_cast<int>(threadIdx.x);
    const int row = chunk / kChunksPerRow;
    const int col = (chunk % kChunksPerRow) * 8;
    int n = row < rows_valid ? cols_valid - col : 0;  // valid elements in this chunk
    n = n < 0 ? 0 : (n > 8 ? 8 : n);
    T* dst = smem + row * LD + col;
    const T* src = gmem + row * row_stride + col;
    if (load_bytes == 16) {
      cp_async_16(dst, n > 0 ? src : gmem, n * 2);
    } else if (load_bytes == 4) {
#pragma unroll
      for (int pair = 0; pair < 4; ++pair) {
        const int m = n - 2 * pair;  // valid elements of this pair: 0, 1 or 2
        const int valid = m < 0 ? 0 : (m > 2 ? 2 : m);
        cp_async_4(dst + 2 * pair, valid > 0 ? src + 2 * pair : gmem, valid * 2);
      }
    } else {
      alignas(16) T vals[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) vals[e] = e < n ? src[e] : T(0.0f);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(vals);
    }
  }
}

// Store two adjacent float values (cols col, col + 1 of one row) as T, skipping cols >= cols_valid.
template <typename T>
__device__ __forceinline__ void store_pair(T* row_ptr, int col, int cols_valid, float x, float y,
                                           bool pair_stores) {
  if (pair_stores && col + 1 < cols_valid) {
    FASTFORMER_CHECK_ALIGNED(row_ptr + col, 4);
    *reinterpret_cast<uint32_t*>(row_ptr + col) = pack2<T>(x, y);
  } else {
    if (col < cols_valid) row_ptr[col] = T(x);
    if (col + 1 < cols_valid) row_ptr[col + 1] = T(y);
  }
}

}  // namespace attention
}  // namespace fastformer
