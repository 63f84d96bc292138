// Host stand-ins for the CUDA language features the kernels of
// csrc/cuda/kernels_global.cuh use, so that a host C++20 compiler compiles
// those very kernels and run_grid() executes them on CPU threads:
//   * one std::thread per CUDA thread of a block, all running at once;
//   * __syncthreads() = arrive_and_wait on a std::barrier of the block's
//     threads (a real barrier: ThreadSanitizer sees exactly the ordering it
//     gives, so a missing one is a reported data race);
//   * threadIdx / blockIdx / blockDim / gridDim are thread_local;
//   * dynamic shared memory (FMNIST_DYNAMIC_SMEM) is a fresh heap buffer of
//     exactly the launch's size per block, filled with 0x7F bytes (huge
//     values, never a valid offset), so AddressSanitizer reports any access
//     past it and a read of an unwritten element shows in the results;
//   * blocks run one after another in a shuffled order (seeded).
//   * FMNIST_EMU_COUNT (the counting build, driver.build_counter): every
//     kernel thread reports its block's shared memory, barriers and vector
//     loads to counter.h's counter, which counts warp-level shared-memory
//     wavefronts, global sectors and barriers per launch.
// Not emulated, because the kernels do not use them: static __shared__,
// atomics, warp intrinsics (__shfl*, __ldg, ...), cooperative groups. Using
// one fails to compile here.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <latch>
#include <memory>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace fmnist_emu {
inline thread_local std::barrier<>* tl_sync = nullptr;
inline thread_local unsigned char* tl_smem = nullptr;
}  // namespace fmnist_emu

#if defined(FMNIST_EMU_COUNT)
#include "counter.h"
#define FMNIST_EMU_HOOK(call) call
namespace fmnist_emu {
// load_vec (kernels_common.cuh) on the host: one counted access per GPU vector load
// (16 bytes when the GPU loads float4 / double2, else one per element).
// Always inlined, so that the counter's call site is the kernel's load.
template <typename T, int N>
__attribute__((always_inline)) inline void counted_load_vec(const T* p, T (&v)[N]) {
  constexpr bool vec = (sizeof(T) == 4 && N % 4 == 0) || (sizeof(T) == 8 && N % 2 == 0);
  count::vector_load(p, v, sizeof(T) * N, vec ? 16 : sizeof(T));
}
}  // namespace fmnist_emu
#define FMNIST_EMU_LOAD_VEC(p, v) ::fmnist_emu::counted_load_vec(p, v)
#else
#define FMNIST_EMU_HOOK(call)
#endif

inline void __syncthreads() {
  FMNIST_EMU_HOOK(fmnist_emu::count::barrier());
  fmnist_emu::tl_sync->arrive_and_wait();
}

#define FMNIST_DYNAMIC_SMEM(name) unsigned char* const name = ::fmnist_emu::tl_smem

namespace fmnist_emu {

// Worker threads kept across launches (creating a thread is slow under
// ThreadSanitizer): thread t runs the t-th CUDA thread of every launch that
// has more than t threads.
class ThreadPool {
 public:
  static ThreadPool& get() {
    static ThreadPool pool;
    return pool;
  }
  // Runs job(t) on threads t = 0 .. n-1 at once; returns when all are done.
  void run(unsigned n, const std::function<void(unsigned)>& job) {
    while (workers_.size() < n) {
      const unsigned t = static_cast<unsigned>(workers_.size());
      // Created before the generation below is published: it waits for it.
      workers_.emplace_back([this, t, g = generation_] { loop(t, g); });
    }
    std::latch done(n);
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &job;
      active_ = n;
      done_ = &done;
      ++generation_;
    }
    cv_.notify_all();
    done.wait();
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void loop(unsigned t, uint64_t seen) {
    for (;;) {
      const std::function<void(unsigned)>* job;
      std::latch* done;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        if (t >= active_) continue;
        job = job_;
        done = done_;
      }
      (*job)(t);
      done->count_down();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  const std::function<void(unsigned)>* job_ = nullptr;
  std::latch* done_ = nullptr;
  unsigned active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// Runs body() as the kernel launch <<<grid, threads, smem_bytes>>>.
template <typename F>
void run_grid(dim3 grid, unsigned threads, size_t smem_bytes, uint64_t seed, const F& body) {
  std::vector<dim3> order;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) order.emplace_back(x, y, z);
  if (order.empty() || threads == 0) return;
  std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));

  std::unique_ptr<unsigned char[]> smem;
  FMNIST_EMU_HOOK(count::begin_launch(threads, smem_bytes));
  // (The completion step after each block ends it for the counter.)
  FMNIST_EMU_HOOK(bool started = false;)
  auto fresh_smem = [&]() noexcept {
    FMNIST_EMU_HOOK(if (started) count::end_block(); started = true;)
    smem.reset(smem_bytes > 0 ? new unsigned char[smem_bytes] : nullptr);
    if (smem_bytes > 0) std::memset(smem.get(), 0x7F, smem_bytes);
  };
  fresh_smem();
  // All threads leave a block before any starts the next; its completion
  // step (run by one thread while the others wait) swaps the shared memory.
  std::barrier block_done(static_cast<std::ptrdiff_t>(threads), fresh_smem);
  std::barrier<> sync(static_cast<std::ptrdiff_t>(threads));
  ThreadPool::get().run(threads, [&](unsigned t) {
    threadIdx = dim3(t, 0, 0);
    blockDim = dim3(threads, 1, 1);
    gridDim = grid;
    tl_sync = &sync;
    for (const dim3& b : order) {
      blockIdx = b;
      tl_smem = smem.get();
      FMNIST_EMU_HOOK(count::begin_thread(t, tl_smem));
      body();
      FMNIST_EMU_HOOK(count::end_thread());
      block_done.arrive_and_wait();
    }
  });
}

}  // namespace fmnist_emu
