// The number of SMs the launch plans see: the device's (a per-device cache,
// safe to call from several host threads at once: each device's count is an
// atomic that is 0 until the first query stores it; two threads racing to
// fill it both store the same value), unless FMNIST_CUDA_SM_COUNT overrides
// it.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace fmnist_ext {
namespace cuda {

constexpr int kMaxCachedDevices = 64;

// `query(device)` returns the device's SM count (it may throw); devices past
// the cache are queried every time.
template <typename Query>
int cached_sm_count(int device, Query&& query) {
  static std::atomic<int> cache[kMaxCachedDevices];
  const bool cached = device >= 0 && device < kMaxCachedDevices;
  if (cached) {
    const int n = cache[device].load(std::memory_order_relaxed);
    if (n > 0) return n;
  }
  int n = query(device);
  n = n > 0 ? n : 1;
  if (cached) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

// FMNIST_CUDA_SM_COUNT=N (1 <= N <= 65536) makes the launch plans see N SMs
// instead of the device's, so that a small batch gets the plans a large one
// gets on a large GPU (several images per block, several grad_weight chunks
// per block, a partly filled last block or chunk). Read at every plan (the
// self-check sets it around some of its cases; the execution harness and
// scripts/gpu_check.sh set it too). Returns 0 when unset or empty, -1 when it
// is not such a number (the op refuses: a typo must not silently mean "no
// override").
inline int sm_count_override() {
  const char* s = std::getenv("FMNIST_CUDA_SM_COUNT");
  if (s == nullptr || *s == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(s, &end, 10);
  if (*end != '\0' || n < 1 || n > 65536) return -1;
  return static_cast<int>(n);
}

}  // namespace cuda
}  // namespace fmnist_ext
