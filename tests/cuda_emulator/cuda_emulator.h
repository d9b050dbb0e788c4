// A CPU emulator of the CUDA execution model, so that fastformer's CUDA kernels (csrc/) run and
// are tested on machines without a GPU. Test infrastructure: never part of the package.
//
// The kernels are compiled by the host compiler with FASTFORMER_CPU_EMULATION, which makes
// csrc/common/kernel_runtime.cuh and csrc/attention/device.cuh take their launch, shared-memory
// and PTX functions from here and from cuda_emulator_ptx.h. A launch runs the grid block by block;
// the threads of a block are fibers (ucontext) on one OS thread, switched only where CUDA threads
// must meet: __syncthreads and the warp-wide operations (shuffles, ldmatrix, mma.sync). So the
// kernel code runs unchanged, deterministically, with the real data exchange of a warp.
//
// What it checks beyond the results (each failure is an exception naming the block and thread):
//   - every lane of a warp reaches the same warp-wide operation, with the full mask, none exited;
//   - a barrier or warp operation that can never complete (deadlock);
//   - dynamic shared memory: launches above 48 KiB need allow_dynamic_shared_memory first, as on
//     a GPU; it starts filled with 0xff bytes (NaN in every float type), so reading what was never
//     written shows;
//   - ldmatrix row addresses and cp.async addresses: alignment, inside the block's dynamic shared
//     memory; the kernels' vector loads and stores of global memory: alignment
//     (FASTFORMER_CHECK_ALIGNED);
//   - shared-memory races between cp.async writes and ldmatrix reads: a read of bytes with a copy
//     in flight or written since the last __syncthreads, a copy over bytes another warp read since
//     the last __syncthreads (plain C++ loads and stores of shared memory are not tracked).
// cp.async copies land when the issuing thread waits for their group (cp.async.wait_group), not
// before, so a missing wait reads the 0xff filler.
//
// Not emulated: timing, memory coalescing, bank conflicts, out-of-bounds global accesses, and the
// exact rounding of the tensor cores (products are summed in double, then rounded to float).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>  // dim3, uint3, cudaStream_t, cudaError_t (host declarations only)
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTFORMER_EMULATOR_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FASTFORMER_EMULATOR_ASAN 1
#endif
#endif
#ifdef FASTFORMER_EMULATOR_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

// CUDA keywords the host compiler does not know (the CUDA headers define the others as empty).
#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static thread_local  // one instance per block: blocks run one at a time per OS thread

namespace fastformer_emulator {

constexpr int kWarpSize = 32;
constexpr size_t kDefaultSharedLimit = 48 * 1024;
constexpr size_t kMaxSharedPerBlock = 227 * 1024;  // sm_90
constexpr size_t kFiberStackBytes = 128 * 1024;  // the kernels' frames take a few KiB

// AddressSanitizer (FASTFORMER_EMULATOR_SANITIZE=address) must be told which stack runs: before an
// exception unwinds frames it unpoisons the current stack, and a fiber's stack is not the thread's.
// Without these, a kernel error thrown in a fiber is reported as a stack-use-after-scope.
#ifdef FASTFORMER_EMULATOR_ASAN
inline void asan_start_switch(void** fake_stack, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
inline void asan_finish_switch(void* fake_stack, const void** bottom_old, size_t* size_old) {
  __sanitizer_finish_switch_fiber(fake_stack, bottom_old, size_old);
}
// Frames a failed block left on its fibers' stacks (never unwound) must not poison the next block's.
inline void asan_unpoison(const void* start, size_t size) { __asan_unpoison_memory_region(start, size); }
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void**, size_t*) {}
inline void asan_unpoison(const void*, size_t) {}
#endif

// What a waiting thread waits for.
enum class Wait : uint8_t { kRunnable, kWarp, kBarrier, kDone };

// The warp-wide operations; all lanes of a warp must reach the same one.
enum class WarpOp : uint8_t { kShuffle, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16 };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kShuffle: return "__shfl_xor_sync";
    case WarpOp::kLdmatrix: return "ldmatrix.x4";
    case WarpOp::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case WarpOp::kMmaF16: return "mma.m16n8k16 (f16)";
    case WarpOp::kMmaBF16: return "mma.m16n8k16 (bf16)";
  }
  return "?";
}

struct AsyncCopy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes;      // copy size (4 or 16)
  int src_bytes;  // bytes read from src; the rest is zero-filled
};

// Per-byte record of dynamic shared memory, for the race checks.
struct ShadowByte {
  uint32_t write_epoch = 0;  // barrier epoch of the last completed cp.async write (0: none)
  uint32_t read_epoch = 0;   // barrier epoch of the last ldmatrix read
  int16_t reader_warp = -1;  // the warp of those reads; -2 when several warps read in that epoch
  bool in_flight = false;    // a cp.async to this byte was issued and has not completed
};

struct Thread {
  ucontext_t context;
  Wait wait = Wait::kRunnable;
  // cp.async of this thread: issued copies not yet complete, in issue order, and where each
  // committed group ends in that list (copies past the last end are not committed yet).
  std::vector<AsyncCopy> copies;
  std::vector<size_t> group_ends;
  // Operands deposited for the current warp-wide operation, and its results.
  uint32_t in[6];
  float in_f[4];
  const void* in_ptr;
  uint32_t out[4];
  float out_f[4];
};

class Block;
Block*& current_block();

class Block {
 public:
  Block(dim3 grid_dim, dim3 block_dim, size_t shared_bytes)
      : grid_dim_(grid_dim), block_dim_(block_dim), threads_(block_dim.x * block_dim.y * block_dim.z),
        shared_(shared_bytes), shadow_(shared_bytes), warps_((threads_ + kWarpSize - 1) / kWarpSize),
        stacks_(new unsigned char[static_cast<size_t>(threads_) * kFiberStackBytes]) {}

  // Runs `body` as every thread of block `index`.
  void run(dim3 index, const std::function<void()>& body) {
    index_ = index;
    body_ = &body;
    error_.clear();
    epoch_ = 1;
    barrier_arrived_ = 0;
    std::fill(shared_.begin(), shared_.end(), static_cast<unsigned char>(0xff));  // memset of none: null
    std::fill(shadow_.begin(), shadow_.end(), ShadowByte{});
    for (WarpState& w : warps_) w = WarpState{};
    threads_state_.assign(threads_, Thread{});
    live_ = threads_;
    asan_unpoison(stacks_.get(), static_cast<size_t>(threads_) * kFiberStackBytes);
    for (int t = 0; t < threads_; ++t) {
      Thread& th = threads_state_[t];
      getcontext(&th.context);
      th.context.uc_stack.ss_sp = fiber_stack(t);
      th.context.uc_stack.ss_size = kFiberStackBytes;
      th.context.uc_link = &scheduler_;
      makecontext(&th.context, &Block::fiber_main, 0);
    }
    Block* previous = current_block();
    current_block() = this;
    try {
      schedule();
    } catch (...) {
      current_block() = previous;
      throw;
    }
    current_block() = previous;
  }

  // --- what kernel code sees -----------------------------------------------------------------
  uint3 thread_index() const {
    const unsigned t = static_cast<unsigned>(current_);
    return uint3{t % block_dim_.x, (t / block_dim_.x) % block_dim_.y, t / (block_dim_.x * block_dim_.y)};
  }
  uint3 block_index() const { return uint3{index_.x, index_.y, index_.z}; }
  dim3 block_dim() const { return block_dim_; }
  dim3 grid_dim() const { return grid_dim_; }
  unsigned char* dynamic_shared_memory() { return shared_.data(); }

  void syncthreads() {
    ++barrier_arrived_;
    if (barrier_arrived_ == live_) {
      release_barrier();
      return;
    }
    wait_as(Wait::kBarrier);
  }

  // A warp-wide operation: deposits this lane's operands with `deposit`, and once every lane of
  // the warp has arrived, `compute(lanes)` fills every lane's results.
  template <typename Deposit, typename Compute>
  void warp_op(WarpOp op, Deposit&& deposit, Compute&& compute) {
    const int warp = current_ / kWarpSize;
    WarpState& w = warps_[warp];
    check_whole_warp(op, warp);
    if (w.arrived == 0) {
      w.op = op;
    } else if (w.op != op) {
      fail(std::string("the lanes of warp ") + std::to_string(warp) + " reached different warp-wide operations (" +
           warp_op_name(w.op) + " and " + warp_op_name(op) + ")");
    }
    deposit(threads_state_[current_]);
    if (++w.arrived < kWarpSize) {
      wait_as(Wait::kWarp);
      return;
    }
    Thread* lanes = &threads_state_[warp * kWarpSize];
    compute(lanes, warp);
    w.arrived = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      if (lanes[l].wait == Wait::kWarp) lanes[l].wait = Wait::kRunnable;
    }
  }

  Thread& thread() { return threads_state_[current_]; }
  int thread_id() const { return current_; }

  // --- shared memory checks --------------------------------------------------------------------
  size_t shared_offset(const void* p, size_t bytes, size_t alignment, const char* what) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c < shared_.data() || c + bytes > shared_.data() + shared_.size()) {
      fail(std::string(what) + ": address outside the block's dynamic shared memory (" +
           std::to_string(shared_.size()) + " bytes)");
    }
    const size_t offset = static_cast<size_t>(c - shared_.data());
    if (offset % alignment != 0) {
      fail(std::string(what) + ": shared address not " + std::to_string(alignment) + "-byte aligned (offset " +
           std::to_string(offset) + ")");
    }
    return offset;
  }

  // ldmatrix by `warp` of `bytes` at shared offset `offset`.
  void record_read(size_t offset, size_t bytes, int warp, const char* what) {
    for (size_t i = offset; i < offset + bytes; ++i) {
      ShadowByte& s = shadow_[i];
      if (s.in_flight) fail(std::string(what) + " reads shared memory (offset " + std::to_string(i) +
                            ") with a cp.async to it still in flight");
      if (s.write_epoch == epoch_) {
        fail(std::string(what) + " reads shared memory (offset " + std::to_string(i) +
             ") written by cp.async since the last __syncthreads (a race: other threads may not see it)");
      }
      if (s.read_epoch != epoch_) {
        s.read_epoch = epoch_;
        s.reader_warp = static_cast<int16_t>(warp);
      } else if (s.reader_warp != warp) {
        s.reader_warp = -2;
      }
    }
  }

  void record_copy_issued(size_t offset, size_t bytes) {
    const int warp = current_ / kWarpSize;
    for (size_t i = offset; i < offset + bytes; ++i) {
      ShadowByte& s = shadow_[i];
      if (s.in_flight) fail("cp.async to shared memory (offset " + std::to_string(i) +
                            ") that another cp.async is still writing");
      if (s.read_epoch == epoch_ && s.reader_warp != warp) {
        fail("cp.async overwrites shared memory (offset " + std::to_string(i) +
             ") that another warp read since the last __syncthreads (a race: the read may see the new data)");
      }
      s.in_flight = true;
    }
  }

  void complete_copy(const AsyncCopy& c) {
    std::memcpy(c.dst, c.src, static_cast<size_t>(c.src_bytes));
    std::memset(c.dst + c.src_bytes, 0, static_cast<size_t>(c.bytes - c.src_bytes));
    const size_t offset = static_cast<size_t>(c.dst - shared_.data());
    for (size_t i = offset; i < offset + static_cast<size_t>(c.bytes); ++i) {
      shadow_[i].in_flight = false;
      shadow_[i].write_epoch = epoch_;
    }
  }

  [[noreturn]] void fail(const std::string& message) {
    throw std::runtime_error("CUDA emulator: block (" + std::to_string(index_.x) + ", " + std::to_string(index_.y) +
                             ", " + std::to_string(index_.z) + "), thread " + std::to_string(current_) + ": " +
                             message);
  }

 private:
  struct WarpState {
    int arrived = 0;
    WarpOp op = WarpOp::kShuffle;
  };

  unsigned char* fiber_stack(int t) { return stacks_.get() + static_cast<size_t>(t) * kFiberStackBytes; }

  static void fiber_main() {
    Block* b = current_block();
    asan_finish_switch(nullptr, &b->scheduler_stack_, &b->scheduler_stack_bytes_);
    try {
      (*b->body_)();
    } catch (const std::exception& e) {
      if (b->error_.empty()) b->error_ = e.what();
    } catch (...) {
      if (b->error_.empty()) b->error_ = "CUDA emulator: unknown exception in a kernel";
    }
    b->thread_exited();
    asan_start_switch(nullptr, b->scheduler_stack_, b->scheduler_stack_bytes_);  // this fiber ends
    // returning switches to uc_link: the scheduler
  }

  void thread_exited() {
    threads_state_[current_].wait = Wait::kDone;
    --live_;
    if (barrier_arrived_ > 0 && barrier_arrived_ == live_) release_barrier();
  }

  void release_barrier() {
    barrier_arrived_ = 0;
    ++epoch_;
    for (Thread& th : threads_state_) {
      if (th.wait == Wait::kBarrier) th.wait = Wait::kRunnable;
    }
  }

  void check_whole_warp(WarpOp op, int warp) {
    if ((warp + 1) * kWarpSize > threads_) {
      fail(std::string(warp_op_name(op)) + " in a partial warp (block of " + std::to_string(threads_) + " threads)");
    }
    for (int l = 0; l < kWarpSize; ++l) {
      if (threads_state_[warp * kWarpSize + l].wait == Wait::kDone) {
        fail(std::string(warp_op_name(op)) + " with the full mask after lane " + std::to_string(l) +
             " of the warp exited");
      }
    }
  }

  void wait_as(Wait wait) {
    Thread& th = threads_state_[current_];
    th.wait = wait;
    void* fake_stack = nullptr;
    asan_start_switch(&fake_stack, scheduler_stack_, scheduler_stack_bytes_);
    swapcontext(&th.context, &scheduler_);
    asan_finish_switch(fake_stack, nullptr, nullptr);
  }

  void schedule() {
    while (live_ > 0) {
      bool progressed = false;
      for (int t = 0; t < threads_; ++t) {
        if (threads_state_[t].wait != Wait::kRunnable) continue;
        current_ = t;
        void* fake_stack = nullptr;
        asan_start_switch(&fake_stack, fiber_stack(t), kFiberStackBytes);
        swapcontext(&scheduler_, &threads_state_[t].context);
        asan_finish_switch(fake_stack, nullptr, nullptr);
        progressed = true;
        if (!error_.empty()) throw std::runtime_error(error_);
      }
      if (!progressed && live_ > 0) {
        int at_barrier = 0, at_warp = 0;
        for (const Thread& th : threads_state_) {
          at_barrier += th.wait == Wait::kBarrier;
          at_warp += th.wait == Wait::kWarp;
        }
        current_ = -1;
        fail("deadlock: " + std::to_string(at_barrier) + " threads wait at __syncthreads and " +
             std::to_string(at_warp) + " at a warp-wide operation that can never complete");
      }
    }
  }

  dim3 grid_dim_, block_dim_;
  dim3 index_{0, 0, 0};
  int threads_;
  std::vector<unsigned char> shared_;
  std::vector<ShadowByte> shadow_;
  std::vector<WarpState> warps_;
  std::unique_ptr<unsigned char[]> stacks_;  // one fiber stack per thread
  std::vector<Thread> threads_state_;
  const std::function<void()>* body_ = nullptr;
  ucontext_t scheduler_;
  const void* scheduler_stack_ = nullptr;  // the stack the scheduler runs on (for ASan's switches)
  size_t scheduler_stack_bytes_ = 0;
  int current_ = -1;
  int live_ = 0;
  int barrier_arrived_ = 0;
  uint32_t epoch_ = 1;  // completed __syncthreads + 1
  std::string error_;
};

inline Block*& current_block() {
  static thread_local Block* block = nullptr;
  return block;
}

inline Block& block() {
  Block* b = current_block();
  if (b == nullptr) throw std::runtime_error("CUDA emulator: device code called outside a kernel launch");
  return *b;
}

// --- dynamic shared memory opt-in, per kernel (as cudaFuncSetAttribute) ---------------------------
inline std::vector<std::pair<const void*, size_t>>& shared_limits() {
  static std::vector<std::pair<const void*, size_t>> limits;
  return limits;
}

inline size_t shared_limit(const void* kernel) {
  for (const auto& [k, bytes] : shared_limits()) {
    if (k == kernel) return bytes;
  }
  return kDefaultSharedLimit;
}

// --- launch --------------------------------------------------------------------------------------
// FASTFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream)(args...): the kernel's parameters
// are copied (passed by value, as to a GPU), then every block of the grid runs in turn.
// FASTFORMER_EMULATOR_BLOCK_SAMPLE=n runs only the first and the last n blocks of every grid: for
// tests of launches too large to emulate whole (the launch is still checked against CUDA's limits).
inline uint64_t sampled_blocks() {
  const char* value = std::getenv("FASTFORMER_EMULATOR_BLOCK_SAMPLE");
  return value == nullptr ? 0 : std::strtoull(value, nullptr, 10);
}

template <typename... Params>
class Launch {
 public:
  Launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes)
      : kernel_(kernel), grid_(grid), block_(block), shared_bytes_(shared_bytes) {}

  template <typename... Args>
  void operator()(Args&&... args) const {
    const unsigned threads = block_.x * block_.y * block_.z;
    if (threads == 0 || threads > 1024) {
      throw std::runtime_error("CUDA emulator: launch with " + std::to_string(threads) +
                               " threads per block (1..1024)");
    }
    if (grid_.x == 0 || grid_.y == 0 || grid_.z == 0 || grid_.y > 65535 || grid_.z > 65535) {
      throw std::runtime_error("CUDA emulator: invalid grid (" + std::to_string(grid_.x) + ", " +
                               std::to_string(grid_.y) + ", " + std::to_string(grid_.z) + ")");
    }
    const size_t limit = shared_limit(reinterpret_cast<const void*>(kernel_));
    if (shared_bytes_ > limit || shared_bytes_ > kMaxSharedPerBlock) {
      throw std::runtime_error("CUDA emulator: launch with " + std::to_string(shared_bytes_) +
                               " bytes of dynamic shared memory; this kernel is allowed " + std::to_string(limit) +
                               " (cudaFuncAttributeMaxDynamicSharedMemorySize)");
    }
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel_, params); };
    Block b(grid_, block_, shared_bytes_);
    const uint64_t blocks = uint64_t{grid_.x} * grid_.y * grid_.z, sample = sampled_blocks();
    uint64_t index = 0;  // in launch order, x fastest
    for (unsigned z = 0; z < grid_.z; ++z) {
      for (unsigned y = 0; y < grid_.y; ++y) {
        for (unsigned x = 0; x < grid_.x; ++x, ++index) {
          if (sample == 0 || index < sample || index + sample >= blocks) b.run(dim3(x, y, z), body);
        }
      }
    }
  }

 private:
  void (*kernel_)(Params...);
  dim3 grid_, block_;
  size_t shared_bytes_;
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t) {
  return Launch<Params...>(kernel, grid, block, shared_bytes);
}

// FASTFORMER_CHECK_ALIGNED (csrc/common/kernel_runtime.cuh): a GPU fails misaligned vector accesses.
inline void check_aligned(const void* ptr, size_t bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % bytes != 0) {
    block().fail(std::string("misaligned address: a ") + std::to_string(bytes) + "-byte access at " + what);
  }
}

inline uint3 thread_idx() { return block().thread_index(); }
inline uint3 block_idx() { return block().block_index(); }
inline dim3 block_dim() { return block().block_dim(); }
inline dim3 grid_dim() { return block().grid_dim(); }

template <typename V>
V shuffle_xor(unsigned mask, V value, int lane_mask, int width) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  Block& b = block();
  if (mask != 0xffffffffu || width != kWarpSize) {
    b.fail("__shfl_xor_sync: only the full mask and width 32 are emulated");
  }
  b.warp_op(
      WarpOp::kShuffle,
      [&](Thread& th) {
        std::memcpy(&th.in[0], &value, 4);
        th.in[1] = static_cast<uint32_t>(lane_mask);
      },
      [](Thread* lanes, int) {
        for (int l = 0; l < kWarpSize; ++l) {
          const int source = l ^ static_cast<int>(lanes[l].in[1] & 31u);
          lanes[l].out[0] = lanes[source].in[0];
        }
      });
  V result;
  std::memcpy(&result, &b.thread().out[0], 4);
  return result;
}

}  // namespace fastformer_emulator

// The CUDA built-in variables and functions kernel code uses.
#define threadIdx (::fastformer_emulator::thread_idx())
#define blockIdx (::fastformer_emulator::block_idx())
#define blockDim (::fastformer_emulator::block_dim())
#define gridDim (::fastformer_emulator::grid_dim())

inline void __syncthreads() { ::fastformer_emulator::block().syncthreads(); }

template <typename V>
V __shfl_xor_sync(unsigned mask, V value, int lane_mask, int width = 32) {
  return ::fastformer_emulator::shuffle_xor(mask, value, lane_mask, width);
}

// Blocks run one after another, and a block's threads switch only at barriers and warp-wide
// operations, so a plain read-modify-write is atomic here.
inline float atomicAdd(float* address, float value) {
  ::fastformer_emulator::check_aligned(address, sizeof(float), "atomicAdd address");
  const float old = *address;
  *address = old + value;
  return old;
}

inline float2 atomicAdd(float2* address, float2 value) {
  ::fastformer_emulator::check_aligned(address, sizeof(float2), "atomicAdd address");
  const float2 old = *address;
  *address = make_float2(old.x + value.x, old.y + value.y);
  return old;
}

using std::max;
using std::min;

namespace fastformer {

inline unsigned char* dynamic_shared_memory() { return ::fastformer_emulator::block().dynamic_shared_memory(); }

template <typename Kernel>
cudaError_t allow_dynamic_shared_memory(Kernel kernel, int bytes) {
  auto& limits = ::fastformer_emulator::shared_limits();
  const void* key = reinterpret_cast<const void*>(kernel);
  const size_t limit = std::max(static_cast<size_t>(bytes), ::fastformer_emulator::kDefaultSharedLimit);
  for (auto& entry : limits) {
    if (entry.first == key) {
      entry.second = limit;
      return cudaSuccess;
    }
  }
  limits.emplace_back(key, limit);
  return cudaSuccess;
}

}  // namespace fastformer

#define FASTFORMER_CHECK_ALIGNED(ptr, bytes) ::fastformer_emulator::check_aligned(ptr, bytes, #ptr)

#define FASTFORMER_LAUNCH(kernel, grid, block, shared_bytes, stream) \
  ::fastformer_emulator::launch(kernel, grid, block, shared_bytes, stream)
