// The warp-level access counter of the counting harness build (interface and
// how accesses reach it: counter.h). Compiled WITHOUT instrumentation.
//
// Per CUDA thread (lane) of a block it records, in program order, the
// shared-memory accesses (inside the block's dynamic shared memory) and the
// global ones (inside a registered buffer) with address, size, direction and
// the instruction that made them (the call site of the instrumentation hook).
// At the end of the block, for each warp (lanes 32w .. 32w+31, threadIdx.x
// order) it groups into one warp request the accesses of its lanes that are
// the k-th execution of the same instruction by each lane, as a warp runs
// them in SIMT: lanes that skip a predicated load do not shift the grouping
// of the loads after it (grouping the i-th access of each lane would mix two
// instructions there). Per request:
//   * shared: 32 banks of 4-byte words; a request costs as many wavefronts as
//     the largest number of DISTINCT words any one bank must deliver (the same
//     word read by several lanes is a broadcast). An 8- or 16-byte access
//     covers 2 or 4 consecutive words, so a warp's float4 load costs at least
//     4 wavefronts (512 bytes at 128 per wavefront), as on the hardware;
//   * global: the distinct 32-byte sectors the request touches;
//   * the distinct sectors read and written over the whole launch (the DRAM
//     traffic if every re-read hits L2).
// Barriers: __syncthreads per warp (the most any lane of the warp executed).
#include "counter.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

namespace fmnist_emu {
namespace count {
namespace {

struct Access {
  uintptr_t pc;  // the instruction (the hook's call site)
  uintptr_t addr;
  uint32_t size;
  bool write;
};

struct Lane {
  std::vector<Access> shared, global;
  uint64_t barriers = 0;
};

struct Range {
  uintptr_t lo, hi;
};

// Registered before any launch (main thread); read by kernel threads, which
// the harness's thread pool starts after a mutex hand-off.
std::vector<Range> g_globals;
std::mutex g_globals_mu;

struct Launch {
  unsigned threads = 0;
  size_t smem = 0;
  std::vector<Lane> lanes;
  uint64_t blocks = 0, shared_requests = 0, shared_wavefronts = 0, shared_ideal = 0;
  uint64_t global_requests = 0, global_sectors = 0, barriers = 0, warps = 0;
  std::unordered_set<uintptr_t> read_sectors, written_sectors;
};
Launch g_launch;

thread_local Lane* tl_lane = nullptr;
thread_local uintptr_t tl_smem_lo = 0, tl_smem_hi = 0;

bool in_global(uintptr_t a) {
  auto it = std::upper_bound(g_globals.begin(), g_globals.end(), a,
                             [](uintptr_t v, const Range& r) { return v < r.lo; });
  if (it == g_globals.begin()) return false;
  --it;
  return a < it->hi;
}

inline void record(uintptr_t pc, uintptr_t a, uint32_t size, bool write) {
  Lane* lane = tl_lane;
  if (lane == nullptr) return;  // not a kernel thread inside a block
  if (a >= tl_smem_lo && a < tl_smem_hi) {
    lane->shared.push_back({pc, a, size, write});
  } else if (in_global(a)) {
    lane->global.push_back({pc, a, size, write});
  }
}

// One lane's access in a warp's list: (instruction, its k-th execution by
// the lane) is the warp request it belongs to.
struct Keyed {
  uintptr_t pc;
  uint32_t occurrence;
  const Access* access;
};

// The warp requests of lanes [w0, w1): their accesses sorted so that each
// request's are adjacent; calls f(first, last) once per request.
template <typename F>
void for_each_request(const std::vector<Lane>& lanes, unsigned w0, unsigned w1,
                      std::vector<Access> Lane::* list, std::vector<Keyed>& keyed, F f) {
  keyed.clear();
  std::unordered_map<uintptr_t, uint32_t> seen;
  for (unsigned t = w0; t < w1; ++t) {
    seen.clear();
    for (const Access& a : lanes[t].*list) keyed.push_back({a.pc, seen[a.pc]++, &a});
  }
  std::sort(keyed.begin(), keyed.end(), [](const Keyed& x, const Keyed& y) {
    return x.pc != y.pc ? x.pc < y.pc : x.occurrence < y.occurrence;
  });
  for (size_t i = 0; i < keyed.size();) {
    size_t j = i + 1;
    while (j < keyed.size() && keyed[j].pc == keyed[i].pc &&
           keyed[j].occurrence == keyed[i].occurrence) {
      ++j;
    }
    f(keyed.data() + i, keyed.data() + j);
    i = j;
  }
}

// Wavefronts of one shared request: max over banks of distinct words.
uint64_t wavefronts(std::vector<uintptr_t>& words) {
  std::sort(words.begin(), words.end());
  words.erase(std::unique(words.begin(), words.end()), words.end());
  unsigned per_bank[32] = {};
  unsigned most = 0;
  for (uintptr_t w : words) most = std::max(most, ++per_bank[w % 32]);
  return most;
}

}  // namespace

void register_global(const void* p, size_t bytes) {
  if (bytes == 0) return;
  std::lock_guard<std::mutex> lock(g_globals_mu);
  const auto lo = reinterpret_cast<uintptr_t>(p);
  g_globals.push_back({lo, lo + bytes});
  std::sort(g_globals.begin(), g_globals.end(),
            [](const Range& a, const Range& b) { return a.lo < b.lo; });
}

void begin_launch(unsigned threads, size_t smem) {
  g_launch = Launch();
  g_launch.threads = threads;
  g_launch.smem = smem;
  g_launch.lanes.resize(threads);
}

void begin_thread(unsigned tid, const unsigned char* smem) {
  tl_lane = &g_launch.lanes[tid];
  tl_smem_lo = reinterpret_cast<uintptr_t>(smem);
  tl_smem_hi = smem != nullptr ? tl_smem_lo + g_launch.smem : 0;
}

void end_thread() { tl_lane = nullptr; }

void barrier() {
  if (tl_lane != nullptr) ++tl_lane->barriers;
}

void vector_load(const void* p, void* dst, size_t bytes, size_t width) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  const auto pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
  for (size_t o = 0; o < bytes; o += width) record(pc, a + o, static_cast<uint32_t>(width), false);
  std::memcpy(dst, p, bytes);
}

void end_block() {
  Launch& L = g_launch;
  ++L.blocks;
  std::vector<uintptr_t> words;
  std::vector<uintptr_t> sectors;
  std::vector<Keyed> keyed;
  for (unsigned w0 = 0; w0 < L.threads; w0 += 32) {
    const unsigned w1 = std::min(L.threads, w0 + 32);
    ++L.warps;
    uint64_t bars = 0;
    for (unsigned t = w0; t < w1; ++t) bars = std::max(bars, L.lanes[t].barriers);
    L.barriers += bars;
    for_each_request(L.lanes, w0, w1, &Lane::shared, keyed, [&](const Keyed* b, const Keyed* e) {
      words.clear();
      for (const Keyed* k = b; k != e; ++k) {
        const Access& a = *k->access;
        for (uintptr_t w = a.addr / 4; w <= (a.addr + a.size - 1) / 4; ++w) words.push_back(w);
      }
      ++L.shared_requests;
      L.shared_wavefronts += wavefronts(words);
      L.shared_ideal += (words.size() + 31) / 32;  // words is deduplicated now
    });
    for_each_request(L.lanes, w0, w1, &Lane::global, keyed, [&](const Keyed* b, const Keyed* e) {
      sectors.clear();
      for (const Keyed* k = b; k != e; ++k) {
        const Access& a = *k->access;
        for (uintptr_t s = a.addr / 32; s <= (a.addr + a.size - 1) / 32; ++s) {
          sectors.push_back(s);
          (a.write ? L.written_sectors : L.read_sectors).insert(s);
        }
      }
      std::sort(sectors.begin(), sectors.end());
      ++L.global_requests;
      L.global_sectors += std::unique(sectors.begin(), sectors.end()) - sectors.begin();
    });
  }
  for (Lane& lane : L.lanes) {
    lane.shared.clear();
    lane.global.clear();
    lane.barriers = 0;
  }
}

std::string end_launch() {
  const Launch& L = g_launch;
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "blocks=%llu warps=%llu shared_requests=%llu shared_wavefronts=%llu "
                "shared_ideal_wavefronts=%llu global_requests=%llu global_sectors=%llu "
                "dram_read_sectors=%zu dram_write_sectors=%zu barriers=%llu",
                (unsigned long long)L.blocks, (unsigned long long)L.warps,
                (unsigned long long)L.shared_requests, (unsigned long long)L.shared_wavefronts,
                (unsigned long long)L.shared_ideal, (unsigned long long)L.global_requests,
                (unsigned long long)L.global_sectors, L.read_sectors.size(),
                L.written_sectors.size(), (unsigned long long)L.barriers);
  return buf;
}

}  // namespace count
}  // namespace fmnist_emu

// The instrumentation's entry points (GCC -fsanitize=kernel-address with
// every check outlined as a call: driver.COUNTER_FLAGS).
extern "C" {
#define FMNIST_CALL_SITE reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define FMNIST_COUNT_HOOKS(n)                                 \
  void __asan_load##n##_noabort(uintptr_t a) {                \
    fmnist_emu::count::record(FMNIST_CALL_SITE, a, n, false); \
  }                                                           \
  void __asan_store##n##_noabort(uintptr_t a) {               \
    fmnist_emu::count::record(FMNIST_CALL_SITE, a, n, true);  \
  }
FMNIST_COUNT_HOOKS(1)
FMNIST_COUNT_HOOKS(2)
FMNIST_COUNT_HOOKS(4)
FMNIST_COUNT_HOOKS(8)
FMNIST_COUNT_HOOKS(16)
#undef FMNIST_COUNT_HOOKS
void __asan_loadN_noabort(uintptr_t a, size_t n) {
  fmnist_emu::count::record(FMNIST_CALL_SITE, a, static_cast<uint32_t>(n), false);
}
void __asan_storeN_noabort(uintptr_t a, size_t n) {
  fmnist_emu::count::record(FMNIST_CALL_SITE, a, static_cast<uint32_t>(n), true);
}
void __asan_handle_no_return() {}
}
