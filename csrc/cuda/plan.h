// Launch plans of the CUDA kernels: which path (shared-memory fast path or
// direct fallback), tile sizes, threads, shared memory and grid. Host-only
// and free of ATen: op_body.h launches with these plans on the GPU and in the
// execution harness (tests/cuda_emulation) alike.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "kernels.cuh"

namespace fmnist_ext {
namespace cuda {

// Shared memory a block may use without opting in to more (the default
// limit on every GPU since Kepler); the fast paths stay below it so that
// several blocks fit on one SM.
constexpr size_t kSmemBudget = 48 * 1024;

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Threads for `items` work items spread over as few rounds of kMaxThreads as
// possible, evenly (a multiple of the warp size).
inline int threads_for(int64_t items) {
  const int64_t rounds = std::max<int64_t>(1, ceil_div64(items, kMaxThreads));
  return static_cast<int>(std::max<int64_t>(32, round_up(ceil_div64(items, rounds), 32)));
}

// Staged image size: the rows/columns read by the convolution outputs that
// reach the pool.
inline Geom make_geom(int64_t n, int64_t cin, int64_t h, int64_t w, int64_t cout,
                      int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                      int64_t pool, int64_t ph, int64_t pw) {
  Geom g;
  g.n = n;
  g.cin = static_cast<int>(cin); g.h = static_cast<int>(h); g.w = static_cast<int>(w);
  g.cout = static_cast<int>(cout); g.kh = static_cast<int>(kh); g.kw = static_cast<int>(kw);
  g.pad_h = static_cast<int>(pad_h); g.pad_w = static_cast<int>(pad_w);
  g.pool = static_cast<int>(pool);
  g.ph = static_cast<int>(ph); g.pw = static_cast<int>(pw);
  g.hs = static_cast<int>(ph * pool + kh - 1);
  g.ws = static_cast<int>(pw * pool + kw - 1);
  return g;
}

// The fast paths keep per-image sizes in int and pack winner rows/columns in
// 16 bits; any geometry whose tiles fit the shared-memory budget satisfies
// this, the check makes it explicit.
inline bool small_geometry(const Geom& g) {
  return g.hs < 32768 && g.ws < 32768 && g.h < 32768 && g.w < 32768;
}

struct FwdPlan {
  bool fast = false;
  int imgs = 1, cgp = kCob, groups = 1, threads = kMaxThreads;
  size_t smem = 0;
  int64_t blocks = 0;
};

inline FwdPlan plan_forward(const Geom& g, size_t elem, int num_sms) {
  FwdPlan p;
  const int64_t taps = static_cast<int64_t>(g.cin) * g.kh * g.kw;
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t img_bytes = static_cast<int64_t>(g.cin) * g.hs * g.ws * elem;
  const int64_t max_wbytes = kSmemBudget / 2;
  int64_t cgp = round_up(g.cout, kCob);
  if ((taps + 1) * cgp * static_cast<int64_t>(elem) > max_wbytes) {
    cgp = max_wbytes / static_cast<int64_t>(elem) / (taps + 1) / kCob * kCob;
  }
  const int64_t wbytes = (taps + 1) * cgp * static_cast<int64_t>(elem);
  const int64_t avail = static_cast<int64_t>(kSmemBudget) - wbytes;
  if (!small_geometry(g) || cgp < kCob || img_bytes > avail) {
    p.fast = false;
    const int64_t total = g.n * g.cout * cells;
    p.threads = kMaxThreads;
    p.blocks = std::min<int64_t>(ceil_div64(total, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  p.cgp = static_cast<int>(cgp);
  p.groups = static_cast<int>(ceil_div64(g.cout, cgp));
  const int64_t items_per_img = (cgp / kCob) * cells;
  int64_t imgs = std::max<int64_t>(1, kMaxThreads / items_per_img);
  imgs = std::min<int64_t>(imgs, avail / std::max<int64_t>(img_bytes, 1));
  // Enough blocks to cover every SM before packing images into blocks.
  imgs = std::min<int64_t>(imgs, std::max<int64_t>(1, g.n * p.groups / num_sms));
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.threads = threads_for(imgs * items_per_img);
  p.smem = fwd_smem_elems<char>(g, p.imgs, p.cgp) * elem;
  p.blocks = ceil_div64(g.n, imgs);
  return p;
}

struct BwdInputPlan {
  bool fast = false;
  int imgs = 1, cinp = 1, cb = 1, threads = kMaxThreads;
  size_t smem = 0;
  int64_t blocks = 0;
};

inline BwdInputPlan plan_backward_input(const Geom& g, size_t elem, int num_sms) {
  BwdInputPlan p;
  p.cb = g.cin == 1 ? 1 : kCib;
  p.cinp = static_cast<int>(round_up(g.cin, p.cb));
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t wbytes = static_cast<int64_t>(g.cout) * g.kh * g.kw * p.cinp * elem;
  const int64_t img_bytes = static_cast<int64_t>(g.cout) * cells * (elem + sizeof(int32_t));
  if (!small_geometry(g) || wbytes > static_cast<int64_t>(kSmemBudget / 2) ||
      img_bytes > static_cast<int64_t>(kSmemBudget) - wbytes) {
    p.fast = false;
    const int64_t total = g.n * g.cin * g.h * g.w;
    p.blocks = std::min<int64_t>(ceil_div64(total, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  const int64_t items_per_img = static_cast<int64_t>(p.cinp / p.cb) * g.h * g.w;
  int64_t imgs = std::max<int64_t>(1, kMaxThreads / std::max<int64_t>(items_per_img, 1));
  imgs = std::min<int64_t>(imgs, (static_cast<int64_t>(kSmemBudget) - wbytes) / std::max<int64_t>(img_bytes, 1));
  imgs = std::min<int64_t>(imgs, std::max<int64_t>(1, g.n / num_sms));
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.threads = threads_for(imgs * items_per_img);
  p.smem = static_cast<size_t>(wbytes) + static_cast<size_t>(imgs * img_bytes);
  p.blocks = ceil_div64(g.n, imgs);
  return p;
}

struct BwdWeightPlan {
  bool fast = false;
  int imgs = 1, slices = 1, threads = kMaxThreads;
  size_t smem = 0;
  int64_t chunks = 0, blocks = 0;
};

inline BwdWeightPlan plan_backward_weight(const Geom& g, size_t elem, size_t acc_elem,
                                          int num_sms) {
  BwdWeightPlan p;
  const int64_t ne = bwd_weight_elems(g);
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t img_bytes =
      (static_cast<int64_t>(g.cin) * g.hs * g.ws + g.cout * cells) * elem +
      g.cout * cells * static_cast<int64_t>(sizeof(int32_t));
  const int64_t max_slices = std::max<int64_t>(1, kMaxThreads / ne);
  if (!small_geometry(g) || ne * static_cast<int64_t>(acc_elem) > static_cast<int64_t>(kSmemBudget / 2) ||
      img_bytes > static_cast<int64_t>(kSmemBudget) - ne * static_cast<int64_t>(acc_elem)) {
    p.fast = false;
    // Slices of the batch so that about 4 waves of threads run.
    const int64_t want = int64_t(num_sms) * kMaxThreads * 4;
    p.slices = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g.n, want / ne)));
    p.blocks = std::min<int64_t>(ceil_div64(ne * p.slices, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  // About two blocks per SM; each block loops over its chunks of images.
  const int64_t want_blocks = 2 * int64_t(num_sms);
  int64_t fit = 1;
  for (int64_t s = max_slices; s >= 1; --s) {
    const int64_t room = static_cast<int64_t>(kSmemBudget) - s * ne * static_cast<int64_t>(acc_elem);
    fit = room / img_bytes;
    if (fit >= 1) { p.slices = static_cast<int>(s); break; }
  }
  int64_t imgs = std::min<int64_t>({fit, int64_t(32), std::max<int64_t>(1, ceil_div64(g.n, want_blocks))});
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.slices = static_cast<int>(std::min<int64_t>(p.slices, imgs));
  p.threads = threads_for(ne * p.slices);
  p.smem = static_cast<size_t>(p.slices) * ne * acc_elem + static_cast<size_t>(imgs) * img_bytes;
  p.chunks = ceil_div64(g.n, imgs);
  p.blocks = std::min<int64_t>(p.chunks, want_blocks);
  return p;
}

}  // namespace cuda
}  // namespace fmnist_ext
