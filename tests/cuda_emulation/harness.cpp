// Execution harness of the CUDA operator: compiles csrc/cuda/op_body.h (the
// op's host decisions and launches) and csrc/cuda/kernels_global.cuh (the
// __global__ kernels, the very text nvcc compiles) with a host C++20 compiler
// and runs them on CPU threads through shim.h. Driven by tests/op/test_cuda.py,
// which builds it under ThreadSanitizer and under AddressSanitizer + UBSan.
//
//   harness DIR NAME...     runs case DIR/NAME.meta for each NAME
//   harness --sm-count      hammers the SM-count cache from 8 threads (TSAN)
//
// NAME.meta is "key value..." lines: op fwd|bwd, dtype f32|f64, pool P,
// pad H W, mask A B C (bwd), sms N (the device's SM count; the plans see
// FMNIST_CUDA_SM_COUNT instead when it is set, as on a GPU), seed S (the
// block order). Tensors are files DIR/NAME.<tensor> (x, w, b for fwd;
// go, x, w, idx for bwd) in the format of read_tensor; outputs are written
// as DIR/NAME.out, .ind (fwd) or .gi, .gw, .gb (bwd), contiguous, the
// kernels launched (grid, threads, shared memory, name) to DIR/NAME.launches
// and the launch plans of the call (plan.h's, for the SM count the op used)
// to DIR/NAME.plan, one "kernel key=value..." line per plan. The counting
// build (FMNIST_EMU_COUNT, counter.h) also writes DIR/NAME.counts: per
// launch, its warp-level counts.
#include "shim.h"  // first: the CUDA stand-ins

#include <cxxabi.h>
#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "cuda/op_body.h"
#include "cuda/sm_count.h"

using namespace fmnist_ext;
using namespace fmnist_ext::cuda;

namespace {

// A host tensor: an exactly-sized heap buffer (AddressSanitizer reports any
// access past it) with sizes and element strides.
struct HostTensor {
  std::shared_ptr<unsigned char[]> data;
  size_t elem = 0;
  std::vector<int64_t> sizes, strides;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : sizes) n *= s;
    return n;
  }
  bool is_contiguous() const {
    int64_t expect = 1;
    for (size_t d = sizes.size(); d-- > 0;) {
      if (sizes[d] != 1 && strides[d] != expect) return false;
      expect *= sizes[d];
    }
    return true;
  }
};

std::vector<int64_t> contiguous_strides(const std::vector<int64_t>& sizes) {
  std::vector<int64_t> st(sizes.size());
  int64_t s = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    st[d] = s;
    s *= sizes[d];
  }
  return st;
}

HostTensor alloc(const std::vector<int64_t>& sizes, size_t elem, int fill) {
  HostTensor t;
  t.elem = elem;
  t.sizes = sizes;
  t.strides = contiguous_strides(sizes);
  const size_t bytes = static_cast<size_t>(t.numel()) * elem;
  t.data.reset(new unsigned char[bytes]);
  std::memset(t.data.get(), fill, bytes);
  FMNIST_EMU_HOOK(fmnist_emu::count::register_global(t.data.get(), bytes));
  return t;
}

// op_body.h's backend on host buffers and fmnist_emu::run_grid.
// The demangled name of a function (the harness is linked with -rdynamic).
std::string symbol_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && d != nullptr ? d : info.dli_sname;
  std::free(d);
  return name;
}

struct HostBackend {
  using Tensor = HostTensor;
  int sms = 1;
  uint64_t seed = 0;
  int launches = 0;
  std::string log;     // one line per launch: grid.x grid.y threads smem kernel
  std::string counts;  // the counting build: one line per launch, counter.cpp's

  // Uninitialised memory is 0x7F bytes: a kernel that leaves an element of
  // an `empty` output unwritten shows up as a huge value.
  template <typename E>
  Tensor empty(std::vector<int64_t> sizes) {
    return alloc(sizes, sizeof(E), 0x7F);
  }
  template <typename E>
  Tensor zeros(std::vector<int64_t> sizes) {
    return alloc(sizes, sizeof(E), 0);
  }
  Tensor contiguous(const Tensor& t) {
    if (t.is_contiguous()) return t;
    Tensor c = alloc(t.sizes, t.elem, 0x7F);
    const int64_t n = t.numel();
    const size_t nd = t.sizes.size();
    for (int64_t i = 0; i < n; ++i) {
      int64_t rem = i, src = 0;
      for (size_t d = nd; d-- > 0;) {
        src += (rem % t.sizes[d]) * t.strides[d];
        rem /= t.sizes[d];
      }
      std::memcpy(c.data.get() + i * t.elem, t.data.get() + src * t.elem, t.elem);
    }
    return c;
  }
  template <typename E>
  E* ptr(const Tensor& t) {
    return reinterpret_cast<E*>(t.data.get());
  }
  int64_t numel(const Tensor& t) { return t.numel(); }
  int num_sms() { return sms; }
  void check(bool ok, const char* message) {
    if (!ok) throw std::runtime_error(message);
  }
  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), dim3 grid, int threads, size_t smem, const A&... args) {
    ++launches;
    log += std::to_string(grid.x) + " " + std::to_string(grid.y) + " " + std::to_string(threads) +
           " " + std::to_string(smem) + " " + symbol_name(reinterpret_cast<const void*>(kernel)) +
           "\n";
    fmnist_emu::run_grid(grid, static_cast<unsigned>(threads), smem, seed * 1000 + launches,
                         [&] { kernel(args...); });
    FMNIST_EMU_HOOK(counts +=
                    fmnist_emu::count::end_launch() + " threads=" + std::to_string(threads) +
                    " smem=" + std::to_string(smem) +
                    " kernel=" + symbol_name(reinterpret_cast<const void*>(kernel)) + "\n");
  }
};

// Tensor file: int64 ndim, sizes[ndim], strides[ndim] (elements), elem size,
// storage bytes; then the storage (the tensor starts at its first byte).
HostTensor read_tensor(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  auto get = [&] {
    int64_t v;
    f.read(reinterpret_cast<char*>(&v), sizeof v);
    if (!f) throw std::runtime_error("truncated " + path);
    return v;
  };
  HostTensor t;
  const int64_t nd = get();
  for (int64_t d = 0; d < nd; ++d) t.sizes.push_back(get());
  for (int64_t d = 0; d < nd; ++d) t.strides.push_back(get());
  t.elem = static_cast<size_t>(get());
  const int64_t bytes = get();
  t.data.reset(new unsigned char[bytes]);
  FMNIST_EMU_HOOK(fmnist_emu::count::register_global(t.data.get(), static_cast<size_t>(bytes)));
  f.read(reinterpret_cast<char*>(t.data.get()), bytes);
  if (!f) throw std::runtime_error("truncated " + path);
  return t;
}

void write_tensor(const std::string& path, const HostTensor& t) {
  std::ofstream f(path, std::ios::binary);
  auto put = [&](int64_t v) { f.write(reinterpret_cast<const char*>(&v), sizeof v); };
  put(static_cast<int64_t>(t.sizes.size()));
  for (int64_t s : t.sizes) put(s);
  for (int64_t s : t.strides) put(s);
  put(static_cast<int64_t>(t.elem));
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.elem);
  put(bytes);
  f.write(reinterpret_cast<const char*>(t.data.get()), bytes);
  if (!f) throw std::runtime_error("cannot write " + path);
}

std::map<std::string, std::vector<std::string>> read_meta(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot open " + path);
  std::map<std::string, std::vector<std::string>> m;
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream ls(line);
    std::string key, v;
    if (!(ls >> key)) continue;
    while (ls >> v) m[key].push_back(v);
  }
  return m;
}

// The plans op_body.h launched with (the same plan.h functions and SM count),
// so the tests can tell which cases run several images per block, several
// grad_weight chunks per block or a partly filled last block or chunk.
void write_plans(const std::string& path, const ConvPoolGeometry& geometry, size_t elem, int sms,
                 bool fwd) {
  const KernelGeometry g = kernel_geometry(geometry);
  std::ofstream f(path);
  f << "call n=" << g.n << " sms=" << sms << "\n";
  if (fwd) {
    const FwdPlan p = plan_forward(g, elem, sms);
    f << "forward fast=" << p.fast << " tiled=" << p.tiled << " imgs=" << p.imgs
      << " blocks=" << p.blocks << "\n";
    return;
  }
  const BwdInputPlan pi = plan_backward_input(g, elem, sms);
  f << "backward_input fast=" << pi.fast << " patch=" << pi.patch << " imgs=" << pi.imgs
    << " blocks=" << pi.blocks << " cb=" << pi.cb << "\n";
  // acc_t is T for float and double (see run_case).
  const BwdWeightPlan pw = plan_backward_weight(g, elem, elem, sms);
  f << "backward_weight fast=" << pw.fast << " dense=" << pw.dense << " imgs=" << pw.imgs
    << " slices=" << pw.slices << " chunks=" << pw.chunks << " blocks=" << pw.blocks << "\n";
}

template <typename T, typename I>
void run_case(const std::string& base, std::map<std::string, std::vector<std::string>>& m) {
  using acc_t = T;  // at::acc_type<T, /*is_cuda=*/true> for float and double
  HostBackend be;
  be.sms = std::stoi(m.at("sms").at(0));
  be.seed = std::stoull(m.at("seed").at(0));
  const int pool = std::stoi(m.at("pool").at(0));
  const int pad_h = std::stoi(m.at("pad").at(0)), pad_w = std::stoi(m.at("pad").at(1));
  const HostTensor x = read_tensor(base + ".x");
  const HostTensor w = read_tensor(base + ".w");
  const ConvPoolGeometry g = make_geometry(x.sizes[0], x.sizes[1], x.sizes[2], x.sizes[3],
                                           w.sizes[0], w.sizes[2], w.sizes[3], pad_h, pad_w, pool);
  if (m.at("op").at(0) == "fwd") {
    HostTensor b;
    const bool has_b = m.count("bias") && m["bias"].at(0) == "1";
    if (has_b) b = read_tensor(base + ".b");
    auto [out, ind] = forward_op<T, acc_t, I>(be, g, x, w, has_b ? &b : nullptr);
    write_tensor(base + ".out", out);
    write_tensor(base + ".ind", ind);
  } else {
    const HostTensor go = read_tensor(base + ".go");
    const HostTensor idx = read_tensor(base + ".idx");
    const auto& mk = m.at("mask");
    const std::array<bool, 3> mask{mk.at(0) == "1", mk.at(1) == "1", mk.at(2) == "1"};
    auto [gi, gw, gb] = backward_op<T, acc_t, I>(be, g, go, x, w, idx, mask);
    write_tensor(base + ".gi", gi);
    write_tensor(base + ".gw", gw);
    write_tensor(base + ".gb", gb);
  }
  std::ofstream(base + ".launches") << be.log;
  FMNIST_EMU_HOOK(std::ofstream(base + ".counts") << be.counts);
  write_plans(base + ".plan", g, sizeof(T), plan_sm_count(be), m.at("op").at(0) == "fwd");
}

int sm_count_race() {
  // Threads of a host program asking for the SM count at once: the cache
  // must be race-free (ThreadSanitizer checks).
  std::vector<std::thread> ts;
  std::atomic<int> bad{0};
  for (int t = 0; t < 8; ++t) {
    ts.emplace_back([&, t] {
      for (int d = 0; d < 4; ++d) {
        const int n = cached_sm_count((t + d) % 4, [](int dev) { return 10 + dev; });
        if (n != 10 + (t + d) % 4) ++bad;
      }
    });
  }
  for (auto& th : ts) th.join();
  std::printf("sm-count %s\n", bad ? "WRONG" : "ok");
  return bad ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 2 && std::string(argv[1]) == "--sm-count") return sm_count_race();
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DIR NAME... | --sm-count\n", argv[0]);
    return 2;
  }
  for (int i = 2; i < argc; ++i) {
    const std::string base = std::string(argv[1]) + "/" + argv[i];
    try {
      auto m = read_meta(base + ".meta");
      const bool f64 = m.at("dtype").at(0) == "f64";
      const bool u8 = std::stoi(m.at("pool").at(0)) <= kMaxPoolForUint8Index;
      if (f64 && u8)
        run_case<double, uint8_t>(base, m);
      else if (f64)
        run_case<double, int32_t>(base, m);
      else if (u8)
        run_case<float, uint8_t>(base, m);
      else
        run_case<float, int32_t>(base, m);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "%s: %s\n", argv[i], e.what());
      return 1;
    }
  }
  std::printf("ran %d cases\n", argc - 2);
  return 0;
}
