// The backward of the CPU kernels for a range of images (backward_images):
// it computes the call's BackwardPlan once (backward_plan.h) and executes it.
// Part of one instruction-set build (kernels.h: compiled once per ISA,
// internal linkage, no ATen/c10 headers).
//
// Per call: the scratch the plan sizes, the winner-offset tables, the filter
// as [cout][kh][kw][cinp] (grad_input). Per image, only for the outputs
// asked for:
//   1. copy the image into the plan's buffers: xp (planar, zero-padded) or
//      xcl (channels last, the layout of gxp); zero gxp.
//   2. per output channel: grad_bias from the masked gradients; then the
//      plan's grad_weight path, from the saved indices directly (first-layer
//      paths) or from the channel's winner list (gather_winners), and
//      grad_input scattered from the same list (or in the same pass).
//   3. grad_input: gxp copied out to NCHW without the padding.
// At the end, the channels-last grad_weight sums (gwcl) are transposed into
// the worker's partial sum; the caller adds the partials of all workers.
// Memory traffic: read input, grad_out and indices once, write grad_input
// once; the weights, the image buffers and partial sums stay in L1/L2.
#pragma once

#include <cstdint>
#include <cstring>

#include "backward_kernels.h"
#include "backward_lists.h"
#include "backward_plan.h"
#include "simd.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

// The scratch of one backward call, laid out as the plan sizes it.
//   xp: zero-padded input [cin][hpx][ws] (planar grad_weight).
//   gxp: zero-padded grad_input, channels last [hp][gws][cinp], so that one
//     winner adds g * filter[:, i, j] to one pixel's channel vector: whole,
//     aligned read-modify-writes that never partly overlap each other.
//   wt: the filter as [cout][kh][kw][cinp], zero past cin.
//   xcl: the input, laid out as gxp (weight_grad_cl).
//   gwcl: grad_weight as [cout][kh][kw][cinp], summed over this call's images.
//   gvals / offs / pix: a channel's winner list; gmask: masked_grads.
//   win_off / win_pix: offset of window position j from the window's corner,
//     in xp and in gxp (a table, so the hot loop does no integer division).
//   code: the WinnerCode table (kFirstLayer), over every uint8 value and, for
//     wider indices, up to the no-gradient marker.
//   corner / dec_off: each window's corner in xp and the decoded offsets
//     (kFirstLayerPool2).
template <typename T>
struct BackwardScratch {
  using E = typename Simd<T>::MElem;
  Scratch<T> vals;
  Scratch<int64_t> offsets;
  Scratch<WinnerCode> code_scratch;
  Scratch<E> decoded;
  T *gxp, *wt, *xcl, *gwcl, *xp, *gvals, *gmask;
  int64_t *offs, *pix, *win_off, *win_pix;
  WinnerCode* code;
  E *corner, *dec_off;

  explicit BackwardScratch(const BackwardPlan& p)
      : vals(p.gxp_size + p.wt_size + p.xcl_size + p.gwcl_size + p.xp_size + 2 * p.cells +
             vector_lanes<T>()),
        offsets(2 * p.cells + 2 * p.pool * p.pool),
        code_scratch(p.ncode),
        decoded(p.ndecoded) {
    // gxp first and every size before xp a multiple of L, so pixel vectors
    // are 32-byte aligned.
    gxp = vals.p;
    wt = gxp + p.gxp_size;
    xcl = wt + p.wt_size;
    gwcl = xcl + p.xcl_size;
    xp = gwcl + p.gwcl_size;
    gvals = xp + p.xp_size;
    gmask = gvals + p.cells;
    offs = offsets.p;      // winner position in xp
    pix = offs + p.cells;  // winner pixel in gxp
    win_off = pix + p.cells;
    win_pix = win_off + p.pool * p.pool;
    code = code_scratch.p;
    corner = decoded.p;
    dec_off = decoded.p + p.cells;
  }
};

// The steps of backward_images below are forced inline, so it compiles as
// one function, as when its body was written in one piece: the plan and the
// scratch pointers do not escape to calls, and the compiler inlines the
// kernels as before (outlined, block 2's backward with all three gradients
// measured ~10% slower on AVX2).

// The per-call tables and buffers that do not depend on the image.
template <typename T>
__attribute__((always_inline)) inline void prepare_backward(const BackwardPlan& p,
                                                            const ConvPoolGeometry& g,
                                                            const T* weight,
                                                            const BackwardScratch<T>& s) {
  using E = typename Simd<T>::MElem;
  if (p.xcl) std::memset(s.gwcl, 0, sizeof(T) * static_cast<size_t>(p.gwcl_size));
  if (p.weight == WeightGradPath::kFirstLayerPool2) {
    for (int64_t ph = 0; ph < g.ph; ++ph) {
      for (int64_t pw = 0; pw < g.pw; ++pw) {
        s.corner[ph * g.pw + pw] = static_cast<E>(ph * p.pool * p.ws + pw * p.pool);
      }
    }
  }
  for (int32_t j = 0; j < p.no_grad; ++j) {
    s.win_off[j] = winner_row(0, j, p.pool) * p.ws + winner_col(0, j, p.pool);
    s.win_pix[j] = winner_row(0, j, p.pool) * p.gws + winner_col(0, j, p.pool);
  }
  for (int64_t j = 0; j < p.ncode; ++j) {
    const bool win = j < p.no_grad;
    s.code[j] = win ? WinnerCode{s.win_off[j], -1} : WinnerCode{p.hp * p.ws, 0};
  }
  if (p.grad_input) {
    for (int64_t co = 0; co < g.cout; ++co) {
      for (int64_t t = 0; t < g.kh * g.kw; ++t) {
        for (int64_t ci = 0; ci < p.cinp; ++ci) {
          s.wt[(co * g.kh * g.kw + t) * p.cinp + ci] =
              ci < g.cin ? weight[(co * g.cin + ci) * g.kh * g.kw + t] : T(0);
        }
      }
    }
  }
}

// Step 1: image n into the plan's buffers; gxp zeroed.
template <typename T, typename I>
__attribute__((always_inline)) inline void load_backward_image(const BackwardPlan& p,
                                                               const BackwardArgs<T, I>& a,
                                                               const BackwardScratch<T>& s,
                                                               int64_t n) {
  const ConvPoolGeometry& g = a.g;
  if (p.xp) load_padded_image(g, a.input, a.input_strides, n, s.xp, p.hpx, p.ws);
  if (p.xcl) load_channels_last_image(g, a.input, a.input_strides, n, s.xcl, p.hp, p.gws, p.cinp);
  if (p.xp_zero_rows) {
    // The zero rows (load_padded_image may have copied image rows that no
    // pooled output reaches there).
    for (int64_t ci = 0; ci < g.cin; ++ci) {
      std::memset(s.xp + ci * p.plane + p.hp * p.ws, 0,
                  sizeof(T) * static_cast<size_t>(g.kh * p.ws));
    }
  }
  if (p.grad_input) std::memset(s.gxp, 0, sizeof(T) * static_cast<size_t>(p.gxp_size));
}

// Step 2: the gradients of output channel co of image n, as the plan says.
template <typename T, typename I>
__attribute__((always_inline)) inline void backward_channel(const BackwardPlan& p,
                                                            const BackwardArgs<T, I>& a,
                                                            const BackwardScratch<T>& s, int64_t n,
                                                            int64_t co) {
  using E = typename Simd<T>::MElem;
  constexpr int64_t L = vector_lanes<T>();
  const ConvPoolGeometry& g = a.g;
  const int64_t base = (n * g.cout + co) * p.cells;
  const I* ind = a.indices + base;
  const T* grad = a.grad_out + base;
  if (p.weight == WeightGradPath::kFirstLayerPool2) {
    // One input channel; the decode's masked gradients give grad_bias too.
    decode_windows_pool2(ind, grad, p.cells, s.corner, static_cast<E>(p.ws),
                         static_cast<E>(p.hp * p.ws), s.dec_off, s.gvals);
    if (p.grad_bias) a.grad_bias_part[co] += lane_sum(s.gvals, p.cells);
    const int64_t ka = split_rows(g.ph) * g.pw;  // windows of chain A
    weight_grad_rows_tile(s.xp, p.ws, g.kh, s.dec_off, s.gvals, ka, p.cells,
                          a.grad_weight_part + co * g.kh * p.kwp, p.kwp);
    return;
  }
  if (p.grad_bias) {
    masked_grads(ind, grad, p.cells, p.no_grad, s.gmask);
    a.grad_bias_part[co] += lane_sum(s.gmask, p.cells);
  }
  if (p.weight == WeightGradPath::kFirstLayer) {
    T* gw_co = a.grad_weight_part + co * g.cin * g.kh * p.kwp;
    for (int64_t ci = 0; ci < g.cin; ++ci) {
      weight_grad_cells(s.xp + ci * p.plane, p.ws, g.kh, ind, grad, g.ph, g.pw, p.pool, p.no_grad,
                        s.code, gw_co + ci * g.kh * p.kwp, p.kwp);
    }
    return;
  }
  if (!p.list) return;
  int64_t ma = 0;  // winners of chain A (split_rows)
  const int64_t m =
      p.list_pix ? gather_winners<true>(ind, grad, g.ph, g.pw, p.pool, p.ws, p.gws, p.no_grad,
                                        s.win_off, s.win_pix, s.offs, s.pix, s.gvals, &ma)
                 : gather_winners<false>(ind, grad, g.ph, g.pw, p.pool, p.ws, p.gws, p.no_grad,
                                         s.win_off, s.win_pix, s.offs, s.pix, s.gvals, &ma);
  if (m == 0) return;
  const int64_t grs = p.gws * p.cinp;  // row stride of gxp and xcl
  switch (p.weight) {
    case WeightGradPath::kChannelsLastWithInput:
      weight_and_input_grad(s.xcl, s.gxp, grs, g.kh, p.nw, s.wt + co * g.kh * g.kw * p.cinp, s.pix,
                            p.cinp, s.gvals, m, s.gwcl + co * g.kh * p.nw * L);
      break;
    case WeightGradPath::kChannelsLast:
      weight_grad_cl(s.xcl, grs, g.kh, p.nw, s.pix, p.cinp, s.gvals, m,
                     s.gwcl + co * g.kh * p.nw * L);
      break;
    case WeightGradPath::kPlanarTile: {
      // grad_weight[co][ci][i][:] += sum over winners of g * input row
      // segment; one vector holds L filter columns (lanes past kw collect
      // garbage that the caller drops).
      T* gw_co = a.grad_weight_part + co * g.cin * g.kh * p.kwp;
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        weight_grad_rows_tile(s.xp + ci * p.plane, p.ws, g.kh, s.offs, s.gvals, ma, m,
                              gw_co + ci * g.kh * p.kwp, p.kwp);
      }
      break;
    }
    case WeightGradPath::kPlanarRows: {
      T* gw_co = a.grad_weight_part + co * g.cin * g.kh * p.kwp;
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        for (int64_t i = 0; i < g.kh; ++i) {
          weight_grad_row(s.xp + ci * p.plane + i * p.ws, p.nq, s.offs, s.gvals, m,
                          gw_co + (ci * g.kh + i) * p.kwp);
        }
      }
      break;
    }
    default: break;  // kNone; the first-layer paths returned above
  }
  if (p.scatter) {
    scatter_input_grad(s.gxp, grs, s.wt + co * g.kh * g.kw * p.cinp, g.kh, p.nw, s.pix, p.cinp,
                       s.gvals, m);
  }
}

// Step 3: gxp back to NCHW without the padding; rows below the last used one
// get 0.
template <typename T>
__attribute__((always_inline)) inline void store_input_grad(const BackwardPlan& p,
                                                            const ConvPoolGeometry& g, const T* gxp,
                                                            int64_t n, T* grad_input) {
  for (int64_t ci = 0; ci < g.cin; ++ci) {
    T* dst = grad_input + (n * g.cin + ci) * g.h * g.w;
    for (int64_t y = 0; y < g.h; ++y) {
      const int64_t r = y + g.pad_h;
      if (r < p.hp) {
        const T* src = gxp + (r * p.gws + g.pad_w) * p.cinp + ci;
        for (int64_t x = 0; x < g.w; ++x) dst[y * g.w + x] = src[x * p.cinp];
      } else {
        for (int64_t x = 0; x < g.w; ++x) dst[y * g.w + x] = T(0);
      }
    }
  }
}

// gwcl[co][i][j][ci] -> the worker's partial sum [co][ci][i][kwp].
template <typename T>
__attribute__((always_inline)) inline void add_channels_last_weight_grad(const BackwardPlan& p,
                                                                         const ConvPoolGeometry& g,
                                                                         const T* gwcl,
                                                                         T* grad_weight_part) {
  constexpr int64_t L = vector_lanes<T>();
  for (int64_t co = 0; co < g.cout; ++co) {
    for (int64_t ci = 0; ci < g.cin; ++ci) {
      for (int64_t i = 0; i < g.kh; ++i) {
        T* dst = grad_weight_part + ((co * g.cin + ci) * g.kh + i) * p.kwp;
        const T* src = gwcl + (co * g.kh + i) * p.nw * L + ci;
        for (int64_t j = 0; j < g.kw; ++j) dst[j] += src[j * p.cinp];
      }
    }
  }
}

}  // namespace

template <typename T, typename I>
void backward_images(const BackwardArgs<T, I>& a, int64_t n0, int64_t n1) {
  const BackwardPlan p = plan_backward<T>(a.g, a.grad_weight_part != nullptr,
                                          a.grad_bias_part != nullptr, a.grad_input != nullptr);
  const BackwardScratch<T> s(p);
  prepare_backward(p, a.g, a.weight, s);
  for (int64_t n = n0; n < n1; ++n) {
    load_backward_image(p, a, s, n);
    for (int64_t co = 0; co < a.g.cout; ++co) backward_channel(p, a, s, n, co);
    if (p.grad_input) store_input_grad(p, a.g, s.gxp, n, a.grad_input);
  }
  if (p.xcl) add_channels_last_weight_grad(p, a.g, s.gwcl, a.grad_weight_part);
}

}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
