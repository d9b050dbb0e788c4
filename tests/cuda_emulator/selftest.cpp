// Kernels with one deliberate bug each, so that a test can check that the emulator reports it
// (tests/test_cuda_emulated.py: test_the_emulator_reports_*). Registered, in the emulator's build
// only, as fastformer_emulated::emulator_selftest(str case); "clean" must run without an error.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "attention/device.cuh"
#include "common/kernel_runtime.cuh"

namespace fastformer {
namespace emulator_selftest {

using attention::cp_async_16;
using attention::cp_async_commit;
using attention::cp_async_wait;
using attention::ldmatrix_x4;

// Two warps. Warp 0 copies a 16-byte row into shared memory, warp 1 reads it with ldmatrix (every
// lane pointing at that row). The flags leave out a step that a GPU needs.
struct Steps {
  bool wait_copy;     // cp.async.wait_group before the barrier
  bool barrier;       // __syncthreads between the copy and the read
  bool same_op;       // every lane of warp 1 reaches the same warp-wide operation
  bool aligned;       // the global vector access is 16-byte aligned
};

__global__ void copy_then_read_kernel(const Steps steps, const uint4* source, uint32_t* out) {
  unsigned char* shared = dynamic_shared_memory();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (warp == 0 && lane == 0) {
    cp_async_16(shared, source, 16);
    cp_async_commit();
    if (steps.wait_copy) cp_async_wait<0>();
  }
  if (steps.barrier) __syncthreads();
  if (warp == 1) {
    uint32_t regs[4];
    if (steps.same_op || lane >= 16) {
      ldmatrix_x4(regs, shared);
    } else {
      regs[0] = __shfl_xor_sync(0xffffffffu, 1u, 1);
    }
    out[lane] = regs[0];
  }
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(source) + (steps.aligned ? 0 : 4);
  FASTFORMER_CHECK_ALIGNED(bytes, 16);
}

// Every thread but thread 0 waits at the barrier; thread 0 waits at a shuffle its warp never joins.
__global__ void deadlock_kernel() {
  if (threadIdx.x == 0) {
    __shfl_xor_sync(0xffffffffu, 0, 1);
  } else {
    __syncthreads();
  }
}

void run(const std::string& name) {
  at::Tensor source = at::arange(4, at::kInt);  // 16 bytes, 16-byte aligned (CPU allocations are)
  at::Tensor out = at::zeros({32}, at::kInt);
  const auto* src = reinterpret_cast<const uint4*>(source.data_ptr());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr());
  Steps steps{true, true, true, true};
  size_t shared = 16;
  if (name == "deadlock") {
    FASTFORMER_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr)();
    return;
  }
  if (name == "missing_wait") {
    steps.wait_copy = false;
  } else if (name == "missing_barrier") {
    steps.barrier = false;
  } else if (name == "divergent_warp") {
    steps.same_op = false;
  } else if (name == "misaligned") {
    steps.aligned = false;
  } else if (name == "shared_without_opt_in") {
    shared = 60 * 1024;
  } else {
    TORCH_CHECK(name == "clean", "emulator_selftest: unknown case ", name);
  }
  FASTFORMER_LAUNCH(copy_then_read_kernel, 1, 64, shared, nullptr)(steps, src, dst);
  // ldmatrix: lane L of warp 1 receives row L / 4, elements 2 (L % 4), +1 of the matrix made of the
  // one row: the 32-bit word L % 4 of the source.
  for (int lane = 0; lane < 32; ++lane) {
    TORCH_CHECK(out[lane].item<int>() == lane % 4, "emulator_selftest: lane ", lane, " read ",
                out[lane].item<int>());
  }
}

}  // namespace emulator_selftest
}  // namespace fastformer

TORCH_LIBRARY_FRAGMENT(fastformer_emulated, m) {
  m.def("emulator_selftest(str case) -> ()", &fastformer::emulator_selftest::run);
}
