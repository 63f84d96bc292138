// Launch plans of the CUDA kernels: which path (shared-memory fast path or
// direct fallback), tile sizes, threads, shared memory and grid. Host-only
// and free of ATen: op_body.h launches with these plans on the GPU and in the
// execution harness (tests/cuda_emulation) alike.
#pragma once

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <iterator>

#include "kernels.cuh"

namespace fmnist_ext {
namespace cuda {

// Shared memory a block may use without opting in to more (the default
// limit on every GPU since Kepler); the fast paths stay below it so that
// several blocks fit on one SM.
constexpr size_t kSmemBudget = 48 * 1024;

// Threads for `items` work items spread over as few rounds of kMaxThreads as
// possible, evenly (a multiple of the warp size).
inline int threads_for(int64_t items) {
  const int64_t rounds = std::max<int64_t>(1, ceil_div(items, kMaxThreads));
  return static_cast<int>(std::max<int64_t>(32, round_up(ceil_div(items, rounds), 32)));
}

// The fast paths keep per-image sizes in int and pack winner rows/columns in
// 16 bits; any geometry whose tiles fit the shared-memory budget satisfies
// this, the check makes it explicit.
inline bool small_geometry(const KernelGeometry& g) {
  return staged_rows(g) < 32768 && staged_cols(g) < 32768 && g.h < 32768 && g.w < 32768;
}

struct FwdPlan {
  bool fast = false, tiled = false;
  int imgs = 1, cgp = kCob, groups = 1, threads = kMaxThreads, xcols = 0, ximg = 0;
  size_t smem = 0;
  int64_t blocks = 0;
};

// The tiled forward's staged strides: rows rounded up to 16 bytes, and the
// smallest image stride at which consecutive images start 16 bytes apart
// modulo the 128 bytes of the 32 banks (the 8 images of a warp's lanes then
// cover every bank once per 16-byte column).
inline void tiled_strides(const KernelGeometry& g, size_t elem, int& xcols, int& ximg) {
  const int per16 = static_cast<int>(16 / elem);
  xcols = static_cast<int>(round_up(staged_cols(g), per16));
  ximg = g.cin * staged_rows(g) * xcols;
  while ((static_cast<size_t>(ximg) * elem) % 128 != 16) ximg += per16;
}

inline FwdPlan plan_forward(const KernelGeometry& g, size_t elem, int num_sms) {
  FwdPlan p;
  if (small_geometry(g) && g.pool == 2 && g.kw == kDenseKW && g.pw % kTileCells == 0) {
    int xcols = 0, ximg = 0;
    tiled_strides(g, elem, xcols, ximg);
    const size_t smem = tiled_smem_bytes(g, ximg, elem);
    const int64_t items =
        static_cast<int64_t>(kTileImgs) * g.ph * (g.pw / kTileCells) * tile_groups(g);
    if (smem <= kSmemBudget && items <= INT_MAX) {
      p.fast = p.tiled = true;
      p.imgs = kTileImgs;
      p.xcols = xcols;
      p.ximg = ximg;
      p.smem = smem;
      p.threads = threads_for(items);
      p.blocks = ceil_div(g.n, int64_t(kTileImgs));
      return p;
    }
  }
  const int64_t taps = static_cast<int64_t>(g.cin) * g.kh * g.kw;
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t img_bytes = static_cast<int64_t>(g.cin) * staged_rows(g) * staged_cols(g) * elem;
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
    p.blocks = std::min<int64_t>(ceil_div(total, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  p.cgp = static_cast<int>(cgp);
  p.groups = static_cast<int>(ceil_div(g.cout, cgp));
  const int64_t items_per_img = (cgp / kCob) * cells;
  int64_t imgs = std::max<int64_t>(1, kMaxThreads / items_per_img);
  imgs = std::min<int64_t>(imgs, avail / std::max<int64_t>(img_bytes, 1));
  // Enough blocks to cover every SM before packing images into blocks.
  imgs = std::min<int64_t>(imgs, std::max<int64_t>(1, g.n * p.groups / num_sms));
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.threads = threads_for(imgs * items_per_img);
  p.smem = fwd_smem_bytes(g, p.imgs, p.cgp, elem);
  p.blocks = ceil_div(g.n, imgs);
  return p;
}

// grad_input: the winner patches for pool 2, 5 x 5 filters and 4 pooled
// columns (patch = true; gstride / vstride: the staged per-image strides),
// else the gather kernel (cb channels per thread) or the direct one.
struct BwdInputPlan {
  bool fast = false, patch = false;
  int imgs = 1, cinp = 1, cb = 1, threads = kMaxThreads, gstride = 0, vstride = 0;
  size_t smem = 0;
  int64_t blocks = 0;
};

inline BwdInputPlan plan_backward_input(const KernelGeometry& g, size_t elem, int num_sms) {
  BwdInputPlan p;
  if (small_geometry(g) && g.pool == 2 && g.kh == kDenseKW && g.kw == kDenseKW &&
      g.pw == kPatchPw && g.cin <= 65535) {
    // Per-image strides that put the 32 images' words in 32 distinct banks:
    // g one element past a multiple of 128 bytes, var one word.
    const int per_img = g.cout * g.ph * g.pw;
    int gstride = per_img;
    while ((static_cast<size_t>(gstride) * elem) % 128 != elem % 128) ++gstride;
    const int vstride = static_cast<int>(round_up(per_img, 128)) + 4;
    const size_t smem = bwd_patch_smem_bytes(g, gstride, vstride, elem);
    if (smem <= kSmemBudget) {
      p.fast = p.patch = true;
      p.cb = 0;
      p.imgs = kPatchImgs;
      p.gstride = gstride;
      p.vstride = vstride;
      p.smem = smem;
      p.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, int64_t(patch_bands(g)) * 32));
      p.blocks = ceil_div(g.n, int64_t(kPatchImgs));
      return p;
    }
  }
  p.cb = g.cin == 1 ? 1 : kCib;
  p.cinp = static_cast<int>(round_up(g.cin, p.cb));
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t wbytes = static_cast<int64_t>(g.cout) * g.kh * g.kw * p.cinp * elem;
  const int64_t img_bytes = static_cast<int64_t>(g.cout) * cells * (elem + sizeof(int32_t));
  if (!small_geometry(g) || wbytes > static_cast<int64_t>(kSmemBudget / 2) ||
      img_bytes > static_cast<int64_t>(kSmemBudget) - wbytes) {
    p.fast = false;
    const int64_t total = g.n * g.cin * g.h * g.w;
    p.blocks = std::min<int64_t>(ceil_div(total, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  const int64_t items_per_img = static_cast<int64_t>(p.cinp / p.cb) * g.h * g.w;
  int64_t imgs = std::max<int64_t>(1, kMaxThreads / std::max<int64_t>(items_per_img, 1));
  imgs = std::min<int64_t>(
      imgs, (static_cast<int64_t>(kSmemBudget) - wbytes) / std::max<int64_t>(img_bytes, 1));
  imgs = std::min<int64_t>(imgs, std::max<int64_t>(1, g.n / num_sms));
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.threads = threads_for(imgs * items_per_img);
  p.smem = bwd_input_smem_bytes(g, p.imgs, p.cinp, elem);
  p.blocks = ceil_div(g.n, imgs);
  return p;
}

// grad_weight: the dense kernel where its filter width, channel count and
// pooled width match one of its instantiations (dense = true; shape: the
// index in kWDenseShapes; xcols / xplane / dband: its strides), else the
// per-element kernel or the direct one.
struct BwdWeightPlan {
  bool fast = false, dense = false;
  int shape = -1, imgs = 1, slices = 1, threads = kMaxThreads, xcols = 0, xplane = 0, dband = 0;
  size_t smem = 0;
  int64_t chunks = 0, blocks = 0;
};

// Blocks per SM of the dense grad_weight kernel's persistent grid.
constexpr int kWDenseBlocksPerSm = 4;

// The dense grad_weight instantiation for g (index in kWDenseShapes), or -1.
inline int wdense_shape(const KernelGeometry& g) {
  if (!small_geometry(g) || g.kw != kDenseKW || g.cin * g.kh > 32 || staged_cols(g) >= 1024 ||
      staged_rows(g) >= 1024) {
    return -1;
  }
  for (int k = 0; k < static_cast<int>(std::size(kWDenseShapes)); ++k) {
    const WDenseShape s = kWDenseShapes[k];
    if (g.cout == s.c && g.pw * g.pool == s.gw &&
        ceil_div(s.c, g.cin * g.kh) <= kWDenseBiasRounds) {
      return k;
    }
  }
  return -1;
}

// Staged image strides for the dense grad_weight kernel, multiples of 4
// (its 16-byte row loads): the row stride xcols >= staged_cols and the plane
// stride xplane >= staged_rows * xcols that spread the rows the lanes
// (band, ci, i) of a warp load at once, ci * xplane + (band * bh + i) *
// xcols, over the most 4-bank groups (float32 words; the first such pair).
inline void wdense_strides(const KernelGeometry& g, int& xcols, int& xplane) {
  const int q = wdense_bands(g), bh = wdense_band_rows(g);
  int best = INT_MAX;
  for (int cs = round_up(staged_cols(g), 4); cs < staged_cols(g) + 32; cs += 4) {
    for (int ps = staged_rows(g) * cs; ps < staged_rows(g) * cs + 32; ps += 4) {
      int starts[32];
      int count = 0;
      for (int b = 0; b < q; ++b) {
        for (int ci = 0; ci < g.cin; ++ci) {
          for (int i = 0; i < g.kh; ++i) starts[count++] = ci * ps + (b * bh + i) * cs;
        }
      }
      std::sort(starts, starts + count);
      count = static_cast<int>(std::unique(starts, starts + count) - starts);
      int groups[8] = {};
      int worst = 0;
      for (int k = 0; k < count; ++k) worst = std::max(worst, ++groups[starts[k] / 4 % 8]);
      if (worst < best) {
        best = worst;
        xcols = cs;
        xplane = ps;
      }
    }
  }
}

inline BwdWeightPlan plan_backward_weight(const KernelGeometry& g, size_t elem, size_t acc_elem,
                                          int num_sms) {
  BwdWeightPlan p;
  const int shape = wdense_shape(g);
  if (shape >= 0) {
    int xcols = 0, xplane = 0;
    wdense_strides(g, xcols, xplane);
    const int64_t q = wdense_bands(g);
    const int64_t band = static_cast<int64_t>(wdense_band_rows(g)) * g.pw * g.pool *
                         wdense_cpad(kWDenseShapes[shape].c);
    const int64_t dband = q > 1 ? round_up(band, int64_t(32)) + 4 : round_up(band, int64_t(4));
    const int64_t img_bytes = (static_cast<int64_t>(g.cin) * xplane + q * dband) * elem;
    const int64_t budget = static_cast<int64_t>(kSmemBudget) - 3 * static_cast<int64_t>(elem);
    const int64_t ne = bwd_weight_elems(g);
    // Warps (one image each per round): at most 4, as many as the slices'
    // sums and one image per warp fit in the budget (the staged images' end
    // is rounded up to 4 elements: up to 3 more).
    const int64_t warps = std::min<int64_t>(
        {4, static_cast<int64_t>(kSmemBudget) / (q * ne * static_cast<int64_t>(acc_elem)),
         budget / img_bytes});
    if (warps >= 1) {
      const int64_t rounds = budget / (warps * img_bytes);
      const int64_t imgs = std::max<int64_t>(1, std::min<int64_t>(warps * rounds, g.n));
      p.fast = p.dense = true;
      p.shape = shape;
      p.imgs = static_cast<int>(imgs);
      p.slices = static_cast<int>(warps * q);
      p.threads = static_cast<int>(warps * 32);
      p.xcols = xcols;
      p.xplane = xplane;
      p.dband = static_cast<int>(dband);
      p.smem = wdense_smem_bytes(g, p.imgs, xplane, p.dband, p.slices, elem, acc_elem);
      p.chunks = ceil_div(g.n, int64_t(p.imgs));
      p.blocks = std::min<int64_t>(p.chunks, int64_t(num_sms) * kWDenseBlocksPerSm);
      return p;
    }
  }
  const int64_t ne = bwd_weight_elems(g);
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t img_bytes =
      (static_cast<int64_t>(g.cin) * staged_rows(g) * staged_cols(g) + g.cout * cells) * elem +
      g.cout * cells * static_cast<int64_t>(sizeof(int32_t));
  const int64_t max_slices = std::max<int64_t>(1, kMaxThreads / ne);
  if (!small_geometry(g) ||
      ne * static_cast<int64_t>(acc_elem) > static_cast<int64_t>(kSmemBudget / 2) ||
      img_bytes > static_cast<int64_t>(kSmemBudget) - ne * static_cast<int64_t>(acc_elem)) {
    p.fast = false;
    // Slices of the batch so that about 4 waves of threads run.
    const int64_t want = int64_t(num_sms) * kMaxThreads * 4;
    p.slices = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(g.n, want / ne)));
    p.blocks = std::min<int64_t>(ceil_div(ne * p.slices, kMaxThreads), int64_t(num_sms) * 64);
    return p;
  }
  p.fast = true;
  // About two blocks per SM; each block loops over its chunks of images.
  const int64_t want_blocks = 2 * int64_t(num_sms);
  int64_t fit = 1;
  for (int64_t s = max_slices; s >= 1; --s) {
    const int64_t room =
        static_cast<int64_t>(kSmemBudget) - s * ne * static_cast<int64_t>(acc_elem);
    fit = room / img_bytes;
    if (fit >= 1) {
      p.slices = static_cast<int>(s);
      break;
    }
  }
  int64_t imgs =
      std::min<int64_t>({fit, int64_t(32), std::max<int64_t>(1, ceil_div(g.n, want_blocks))});
  imgs = std::max<int64_t>(1, std::min<int64_t>(imgs, g.n));
  p.imgs = static_cast<int>(imgs);
  p.slices = static_cast<int>(std::min<int64_t>(p.slices, imgs));
  p.threads = threads_for(ne * p.slices);
  p.smem = bwd_weight_smem_bytes(g, p.imgs, p.slices, elem, acc_elem);
  p.chunks = ceil_div(g.n, imgs);
  p.blocks = std::min<int64_t>(p.chunks, want_blocks);
  return p;
}

}  // namespace cuda
}  // namespace fmnist_ext
