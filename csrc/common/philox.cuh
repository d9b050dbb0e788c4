// Counter-based dropout masks, bit-identical to the Triton backend's (fastformer/triton/dropout.py).
//
// A tensor is viewed as rows of its last dim, L long. Element (row, col) is kept when
//   uniform(word col % 4 of Philox(seed, group)) >= p,   group = row * ceil(L / 4) + col / 4:
// one Philox-4x32-10 call (key (seed_lo, seed_hi), counter (group_lo, group_hi, 0, 0)) for every
// 4 consecutive elements of a row, all four output words used, as Triton's tl.rand4x; a word w,
// read as int32, becomes (w < 0 ? ~w : w) * 4.6566127342e-10f, a float in [0, 1). Because both
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
  // The largest scale with INT32_MAX * scale < 1 in float32 (Triton's uint_to_uniform_float).
  static constexpr float kUniformScale = 4.6566127342e-10f;

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

  FASTFORMER_HOST_DEVICE static float uniform(uint32_t word) {
    int32_t bits = static_cast<int32_t>(word);
    bits = bits < 0 ? ~bits : bits;
    return static_cast<float>(bits) * kUniformScale;
  }

  // The Philox counter of the group holding element (row, col) of rows `row_length` long.
  FASTFORMER_HOST_DEVICE static uint64_t group(uint64_t row, uint64_t col, uint64_t row_length) {
    return row * ((row_length + 3) / 4) + col / 4;
  }

  // Word k (0..3) by selects: an index computed at run time would put the words in local memory.
  FASTFORMER_HOST_DEVICE static uint32_t word(const Words& words, uint64_t k) {
    return k == 0 ? words.w[0] : k == 1 ? words.w[1] : k == 2 ? words.w[2] : words.w[3];
  }

  // Whether element (row, col) survives dropout with probability p (p as float32, like the Triton
  // kernels, which receive dropout_p as a float32 scalar).
  FASTFORMER_HOST_DEVICE static bool keep(uint64_t seed, uint64_t row, uint64_t col, uint64_t row_length,
                                          float p) {
    return uniform(word(words(seed, group(row, col, row_length)), col % 4)) >= p;
  }

  // The keep bits of one whole group: bit k for element (row, col4 + k), col4 a multiple of 4.
  FASTFORMER_HOST_DEVICE static uint32_t keep_group(uint64_t seed, uint64_t row, uint64_t col4, uint64_t row_length,
                                                    float p) {
    const Words drawn = words(seed, group(row, col4, row_length));
    uint32_t bits = 0;
    FASTFORMER_UNROLL
    for (int k = 0; k < 4; ++k) bits |= static_cast<uint32_t>(uniform(drawn.w[k]) >= p) << k;
    return bits;
  }

  // keep() of elements col .. col + kCount - 1 of one row, one Philox call per group of 4 they
  // touch (two for 8 elements starting at a multiple of 4).
  template <int kCount>
  FASTFORMER_HOST_DEVICE static void keep_run(uint64_t seed, uint64_t row, uint64_t col, uint64_t row_length,
                                              float p, bool (&keep)[kCount]) {
    Words drawn = words(seed, group(row, col, row_length));
    FASTFORMER_UNROLL
    for (int i = 0; i < kCount; ++i) {
      const uint64_t c = col + static_cast<uint64_t>(i);
      if (i > 0 && c % 4 == 0) drawn = words(seed, group(row, c, row_length));
      keep[i] = uniform(word(drawn, c % 4)) >= p;
    }
  }
};

}  // namespace fastformer
