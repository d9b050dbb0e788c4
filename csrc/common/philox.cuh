// Counter-based dropout masks, bit-identical to the Triton backend's.
//
// Element `offset` of a tensor (its index in the op's logical row-major order) is kept when
//   uniform(seed, offset) >= p,
// where uniform is Triton's tl.rand: Philox-4x32 with 10 rounds, key (seed_lo, seed_hi),
// counter (offset_lo, offset_hi, 0, 0); the first output word w, read as int32, becomes
// (w < 0 ? ~w : w) * 4.6566127342e-10f, a float in [0, 1). Because both backends evaluate the
// same function of (seed, offset), a test can build the reference mask with either one, and a
// backward pass regenerates the forward's mask instead of storing it.
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

  // First 32-bit output word of Philox-4x32-10 for counter (offset_lo, offset_hi, 0, 0).
  FASTFORMER_HOST_DEVICE static uint32_t first_word(uint64_t seed, uint64_t offset) {
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32);
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
    return c0;
  }

  FASTFORMER_HOST_DEVICE static float uniform(uint64_t seed, uint64_t offset) {
    int32_t bits = static_cast<int32_t>(first_word(seed, offset));
    bits = bits < 0 ? ~bits : bits;
    return static_cast<float>(bits) * kUniformScale;
  }

  // Whether the element at `offset` survives dropout with probability p (p as float32, like
  // the Triton kernels, which receive dropout_p as a float32 scalar).
  FASTFORMER_HOST_DEVICE static bool keep(uint64_t seed, uint64_t offset, float p) {
    return uniform(seed, offset) >= p;
  }
};

}  // namespace fastformer
