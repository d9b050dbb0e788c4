// Counter-based dropout masks, bit-identical to the Triton backend's (fastformer/triton/dropout.py).
//
// A tensor is viewed as rows of its last dim, L long. Element (row, col) is kept when
//   half col % 2 (0: the low 16 bits) of word (col % 8) / 2 of Philox(seed, group) >= round(p 2^16),
//   group = row * ceil(L / 8) + col / 8:
// one Philox-4x32-10 call (key (seed_lo, seed_hi), counter (group_lo, group_hi, 0, 0), as Triton's
// tl.randint4x) for every 8 consecutive elements of a row, all 128 output bits used; round(p 2^16)
// is computed in float32 (p 2^16 is exact), so p is rounded to a multiple of 2^-16. Because both
// backends evaluate the same function, a test can build the reference mask with either one, and
// a backward pass regenerates the forward's mask instead of storing it.
//
// Written for host and device, so the host side can be checked against Triton on a CPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTFORMER_HOST_DEVICE __host__ __device__ __forceinline__
#define FASTFORMER_UNROLL _Pragma("unroll")
#else
#define FASTFORMER_HOST_DEVICE inline
#define FASTFORMER_UNROLL  // host compilers unroll the fixed 10 rounds on their own at -O3
#endif

namespace fastformer {

struct Philox {
  // Multipliers and Weyl key increments of Philox-4x32 (Salmon et al., SC'11).
  static constexpr uint32_t kRoundA = 0xD2511F53u;
  static constexpr uint32_t kRoundB = 0xCD9E8D57u;
  static constexpr uint32_t kKeyA = 0x9E3779B9u;
  static constexpr uint32_t kKeyB = 0xBB67AE85u;
  static constexpr int kRounds = 10;
  static constexpr int kGroup = 8;  // elements per call: the two 16-bit halves of each word

  FASTFORMER_HOST_DEVICE static uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
  }

  struct Words {
    uint32_t w[4];
  };

  // The four 32-bit output words of Philox-4x32-10 for counter (counter_lo, counter_hi, 0, 0).
  FASTFORMER_HOST_DEVICE static Words words(uint64_t seed, uint64_t counter) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
    uint32_t c2 = 0, c3 = 0;
    FASTFORMER_UNROLL
    for (int round = 0; round < kRounds; ++round) {
      const uint32_t old_c0 = c0, old_c2 = c2;
      c0 = mulhi(kRoundB, old_c2) ^ c1 ^ k0;
      c2 = mulhi(kRoundA, old_c0) ^ c3 ^ k1;
      c1 = kRoundB * old_c2;
      c3 = kRoundA * old_c0;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    return Words{{c0, c1, c2, c3}};
  }

  // round(p 2^16) in float32: an element whose 16-bit uniform is below it is dropped (p = 1 drops
  // everything, p = 0 nothing). p as float32, like the Triton kernels, which receive dropout_p as a
  // float32 scalar.
  FASTFORMER_HOST_DEVICE static uint32_t drop_threshold(float p) {
    return static_cast<uint32_t>(p * 65536.0f + 0.5f);
  }

  // The Philox counter of the group holding element (row, col) of rows `row_length` long.
  FASTFORMER_HOST_DEVICE static uint64_t group(uint64_t row, uint64_t col, uint64_t row_length) {
    return row * ((row_length + kGroup - 1) / kGroup) + col / kGroup;
  }

  // The 16-bit uniform of element k (0..7) of a group, the word picked by selects: an index
  // computed at run time would put the words in local memory.
  FASTFORMER_HOST_DEVICE static uint32_t half(const Words& words, uint64_t k) {
    const uint64_t w = k / 2;
    const uint32_t word = w == 0 ? words.w[0] : w == 1 ? words.w[1] : w == 2 ? words.w[2] : words.w[3];
    return k % 2 == 0 ? word & 0xFFFFu : word >> 16;
  }

  // Whether element (row, col) survives dropout (threshold: drop_threshold(p)).
  FASTFORMER_HOST_DEVICE static bool keep(uint64_t seed, uint64_t row, uint64_t col, uint64_t row_length,
                                          uint32_t threshold) {
    return half(words(seed, group(row, col, row_length)), col % kGroup) >= threshold;
  }

  // The keep bits of one whole group: bit k for element (row, col8 + k), col8 a multiple of 8.
  FASTFORMER_HOST_DEVICE static uint32_t keep_group(uint64_t seed, uint64_t row, uint64_t col8, uint64_t row_length,
                                                    uint32_t threshold) {
    const Words drawn = words(seed, group(row, col8, row_length));
    uint32_t bits = 0;
    FASTFORMER_UNROLL
    for (int w = 0; w < 4; ++w) {
      bits |= static_cast<uint32_t>((drawn.w[w] & 0xFFFFu) >= threshold) << (2 * w);
      bits |= static_cast<uint32_t>((drawn.w[w] >> 16) >= threshold) << (2 * w + 1);
    }
    return bits;
  }

  // keep() of elements col .. col + kCount - 1 of one row (a vector), col a multiple of kCount:
  // with kCount dividing 8 they lie in one group, so one Philox call serves them all.
  template <int kCount>
  FASTFORMER_HOST_DEVICE static void keep_run(uint64_t seed, uint64_t row, uint64_t col, uint64_t row_length,
                                              uint32_t threshold, bool (&keep)[kCount]) {
    static_assert(kGroup % kCount == 0, "a vector of kCount elements, kCount dividing the group");
    const Words drawn = words(seed, group(row, col, row_length));
    FASTFORMER_UNROLL
    for (int i = 0; i < kCount; ++i) keep[i] = half(drawn, col % kGroup + static_cast<uint64_t>(i)) >= threshold;
  }
};

}  // namespace fastformer
