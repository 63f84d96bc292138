// Per-device cache of the number of SMs (the launch plans' input), safe to
// call from several host threads at once: each device's count is an atomic
// that is 0 until the first query stores it (two threads racing to fill it
// both store the same value).
#pragma once

#include <atomic>

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

}  // namespace cuda
}  // namespace fmnist_ext
