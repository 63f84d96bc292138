// The backward of the CPU kernels for a range of images (backward_images).
// Part of one instruction-set build (kernels.h: compiled once per ISA,
// internal linkage, no ATen/c10 headers).
//
// Per image, only for the outputs asked for:
//   1. copy the image into the buffers the chosen path reads: xp (planar,
//      zero-padded) or xcl (channels last, the layout of gxp); zero gxp.
//   2. per output channel: grad_bias from the masked gradients; then
//      grad_weight from the saved indices directly (a first layer) or from
//      the channel's winner list (gather_winners), and grad_input scattered
//      from the same list (or in the same pass).
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
#include "simd.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {

template <typename T, typename I>
void backward_images(const BackwardArgs<T, I>& a, int64_t n0, int64_t n1) {
  const ConvPoolGeometry& g = a.g;
  constexpr int64_t L = vector_lanes<T>();
  const int64_t pool = g.pool;
  const int64_t owu = g.pw * pool;
  const int64_t ohu = g.ph * pool;
  const int64_t nq = ceil_div(g.kw, L);  // vectors per filter row (grad_weight)
  const int64_t kwp = padded_kw<T>(g.kw);
  const int64_t hp = ohu + g.kh - 1;
  const int64_t ws = imax(g.w + 2 * g.pad_w, owu - 1 + nq * L);
  const bool need_gw = a.grad_weight_part != nullptr;
  const bool need_gb = a.grad_bias_part != nullptr;
  const bool need_gi = a.grad_input != nullptr;
  // grad_weight straight from the indices (weight_grad_cells) when there is
  // no grad_input to scatter and a filter row fits one vector; xp then has kh
  // zero rows below each plane for the windows without a winner.
  const bool cells_path = need_gw && !need_gi && g.cin == 1 && nq == 1 && g.kh <= kMaxKhTile;
  const int64_t hpx = cells_path ? hp + g.kh : hp;  // rows of an xp plane
  const int64_t plane = hpx * ws;
  const int64_t gws = g.w + 2 * g.pad_w;    // grad_input buffer row length
  const int64_t cinp = round_up(g.cin, L);  // channels padded to vectors
  const int64_t cells = g.ph * g.pw;
  const int32_t no_grad = no_grad_index(pool);
  const int64_t nw = g.kw * cinp / L;  // vectors per filter row, channels last
  // grad_weight with the input channels in the lanes (weight_grad_cl) for
  // several input channels, from a channels-last copy of the input.
  const bool cl_path = need_gw && g.cin > 1 && weight_grad_cl_supported(nw);
  const bool planar_gw = need_gw && !cl_path;

  // xp: zero-padded input [cin][hp][ws] (for grad_weight).
  // gxp: zero-padded grad_input, channels last [hp][gws][cinp], so that one
  //   winner adds g * filter[:, i, j] to one pixel's channel vector: whole,
  //   aligned read-modify-writes that never partly overlap each other.
  // wt: the filter as [cout][kh][kw][cinp], zero past cin.
  // xcl: the input, laid out as gxp (weight_grad_cl).
  // gwcl: grad_weight as [cout][kh][kw][cinp], summed over this call's images.
  const int64_t xp_size = planar_gw ? g.cin * plane : 0;
  const int64_t gxp_size = need_gi ? hp * gws * cinp : 0;
  const int64_t wt_size = need_gi ? g.cout * g.kh * g.kw * cinp : 0;
  const int64_t xcl_size = cl_path ? hp * gws * cinp : 0;
  const int64_t gwcl_size = cl_path ? g.cout * g.kh * nw * L : 0;
  Scratch<T> scratch(gxp_size + wt_size + xcl_size + gwcl_size + xp_size + 2 * cells + L);
  // gxp first and every size before xp a multiple of L, so pixel vectors are
  // 32-byte aligned.
  T* gxp = scratch.p;
  T* wt = gxp + gxp_size;
  T* xcl = wt + wt_size;
  T* gwcl = xcl + xcl_size;
  T* xp = gwcl + gwcl_size;
  T* gvals = xp + xp_size;
  T* gmask = gvals + cells;  // masked_grads (grad_bias)
  Scratch<int64_t> offsets(2 * cells + 2 * pool * pool);
  if (cl_path) std::memset(gwcl, 0, sizeof(T) * static_cast<size_t>(gwcl_size));
  int64_t* offs = offsets.p;         // winner position in xp
  int64_t* pix = offsets.p + cells;  // winner pixel in gxp
  int64_t* win_off = pix + cells;
  int64_t* win_pix = win_off + pool * pool;
  // The index-driven path's decode table (see WinnerCode), over every uint8
  // value and, for wider indices, up to the no-gradient marker.
  const int64_t ncode = cells_path ? imax(256, int64_t{no_grad} + 1) : 0;
  Scratch<WinnerCode> code_scratch(ncode);
  WinnerCode* code = code_scratch.p;
  // Pool 2 decodes a channel's windows with vector operations first
  // (decode_windows_pool2): each window's corner in xp and the decoded offsets.
  using E = typename Simd<T>::MElem;
  const bool decode2 = cells_path && pool == 2;
  Scratch<E> decoded(decode2 ? 2 * cells : 0);
  E* corner = decoded.p;
  E* dec_off = decoded.p + cells;
  if (decode2) {
    for (int64_t ph = 0; ph < g.ph; ++ph) {
      for (int64_t pw = 0; pw < g.pw; ++pw) {
        corner[ph * g.pw + pw] = static_cast<E>(ph * pool * ws + pw * pool);
      }
    }
  }

  // Offset of window position j from the window's corner, in xp and in gxp
  // (a table, so the hot loop does no integer division).
  for (int32_t j = 0; j < no_grad; ++j) {
    win_off[j] = winner_row(0, j, pool) * ws + winner_col(0, j, pool);
    win_pix[j] = winner_row(0, j, pool) * gws + winner_col(0, j, pool);
  }
  for (int64_t j = 0; j < ncode; ++j) {
    const bool win = j < no_grad;
    code[j] = win ? WinnerCode{win_off[j], -1} : WinnerCode{hp * ws, 0};
  }

  if (need_gi) {
    for (int64_t co = 0; co < g.cout; ++co) {
      for (int64_t t = 0; t < g.kh * g.kw; ++t) {
        for (int64_t ci = 0; ci < cinp; ++ci) {
          wt[(co * g.kh * g.kw + t) * cinp + ci] =
              ci < g.cin ? a.weight[(co * g.cin + ci) * g.kh * g.kw + t] : T(0);
        }
      }
    }
  }

  for (int64_t n = n0; n < n1; ++n) {
    if (planar_gw) load_padded_image(g, a.input, a.input_strides, n, xp, hpx, ws);
    if (cl_path) load_channels_last_image(g, a.input, a.input_strides, n, xcl, hp, gws, cinp);
    if (cells_path) {
      // The zero rows (load_padded_image may have copied image rows that no
      // pooled output reaches there).
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        std::memset(xp + ci * plane + hp * ws, 0, sizeof(T) * static_cast<size_t>(g.kh * ws));
      }
    }
    if (need_gi) std::memset(gxp, 0, sizeof(T) * static_cast<size_t>(gxp_size));
    for (int64_t co = 0; co < g.cout; ++co) {
      // Gather the windows of this channel that pass a gradient.
      const int64_t base = (n * g.cout + co) * cells;
      if (need_gb && !decode2) {
        masked_grads(a.indices + base, a.grad_out + base, cells, no_grad, gmask);
        a.grad_bias_part[co] += lane_sum(gmask, cells);
      }
      if (decode2) {
        // One input channel (cells_path).
        decode_windows_pool2(a.indices + base, a.grad_out + base, cells, corner, static_cast<E>(ws),
                             static_cast<E>(hp * ws), dec_off, gvals);
        if (need_gb) a.grad_bias_part[co] += lane_sum(gvals, cells);
        const int64_t ka = split_rows(g.ph) * g.pw;  // windows of chain A
        weight_grad_rows_tile(xp, ws, g.kh, dec_off, gvals, ka, cells,
                              a.grad_weight_part + co * g.kh * kwp, kwp);
        continue;
      }
      if (cells_path) {
        T* gw_co = a.grad_weight_part + co * g.cin * g.kh * kwp;
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          weight_grad_cells(xp + ci * plane, ws, g.kh, a.indices + base, a.grad_out + base, g.ph,
                            g.pw, pool, no_grad, code, gw_co + ci * g.kh * kwp, kwp);
        }
        continue;
      }
      int64_t ma = 0;  // winners of chain A (split_rows)
      const int64_t m =
          (need_gi || cl_path)
              ? gather_winners<true>(a.indices + base, a.grad_out + base, g.ph, g.pw, pool, ws, gws,
                                     no_grad, win_off, win_pix, offs, pix, gvals, &ma)
              : gather_winners<false>(a.indices + base, a.grad_out + base, g.ph, g.pw, pool, ws,
                                      gws, no_grad, win_off, win_pix, offs, pix, gvals, &ma);
      if (m == 0) continue;
      if (cl_path && need_gi && weight_and_input_grad_cl_supported(nw)) {
        weight_and_input_grad(xcl, gxp, gws * cinp, g.kh, nw, wt + co * g.kh * g.kw * cinp, pix,
                              cinp, gvals, m, gwcl + co * g.kh * nw * L);
        continue;
      }
      if (cl_path) {
        weight_grad_cl(xcl, gws * cinp, g.kh, nw, pix, cinp, gvals, m, gwcl + co * g.kh * nw * L);
      } else if (need_gw) {
        // grad_weight[co][ci][i][:] += sum over winners of g * input row
        // segment; one vector holds L filter columns (lanes past kw collect
        // garbage that the caller drops).
        T* gw_co = a.grad_weight_part + co * g.cin * g.kh * kwp;
        if (nq == 1 && g.kh <= kMaxKhTile) {
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            weight_grad_rows_tile(xp + ci * plane, ws, g.kh, offs, gvals, ma, m,
                                  gw_co + ci * g.kh * kwp, kwp);
          }
        } else {
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            for (int64_t i = 0; i < g.kh; ++i) {
              weight_grad_row(xp + ci * plane + i * ws, nq, offs, gvals, m,
                              gw_co + (ci * g.kh + i) * kwp);
            }
          }
        }
      }
      if (need_gi) {
        scatter_input_grad(gxp, gws * cinp, wt + co * g.kh * g.kw * cinp, g.kh, g.kw * cinp / L,
                           pix, cinp, gvals, m);
      }
    }
    if (need_gi) {
      // Back to NCHW without the padding; rows below the last used one get 0.
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        T* dst = a.grad_input + (n * g.cin + ci) * g.h * g.w;
        for (int64_t y = 0; y < g.h; ++y) {
          const int64_t r = y + g.pad_h;
          if (r < hp) {
            const T* src = gxp + (r * gws + g.pad_w) * cinp + ci;
            for (int64_t x = 0; x < g.w; ++x) dst[y * g.w + x] = src[x * cinp];
          } else {
            for (int64_t x = 0; x < g.w; ++x) dst[y * g.w + x] = T(0);
          }
        }
      }
    }
  }
  if (cl_path) {
    // gwcl[co][i][j][ci] -> the worker's partial sum [co][ci][i][kwp].
    for (int64_t co = 0; co < g.cout; ++co) {
      for (int64_t ci = 0; ci < g.cin; ++ci) {
        for (int64_t i = 0; i < g.kh; ++i) {
          T* dst = a.grad_weight_part + ((co * g.cin + ci) * g.kh + i) * kwp;
          const T* src = gwcl + (co * g.kh + i) * nw * L + ci;
          for (int64_t j = 0; j < g.kw; ++j) dst[j] += src[j * cinp];
        }
      }
    }
  }
}

}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
