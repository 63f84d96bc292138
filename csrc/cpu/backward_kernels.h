// The backward's arithmetic on one output channel: grad_weight and
// grad_input from the channel's winners (a list from gather_winners, or the
// saved indices decoded window by window). Part of one instruction-set build
// (kernels.h: compiled once per ISA, internal linkage, no ATen/c10 headers);
// which kernel runs is chosen once per call in backward_plan.h.
//
// grad_weight += g * input patch, accumulated over the winners in registers,
//   then added to a per-call partial sum (the caller adds the partials of all
//   workers: no atomics). Two layouts:
//   - channels last (weight_grad_cl, weight_and_input_grad): the input copied
//     as [hp][gws][cinp] like gxp (load_channels_last_image), so a filter
//     row's input is a few whole vectors (kw pixels x cinp channels) and one
//     FMA covers L (column, channel) pairs; with grad_input too, one pass over
//     the winners per filter row with the row's weights in registers.
//   - planar rows (weight_grad_row, weight_grad_rows_tile, weight_grad_cells),
//     one vector covering a filter row; the index-driven weight_grad_cells
//     visits every window, a window without a winner reading zero rows below
//     the image with g = +0.
//   Planar sums over windows run as two chains side by side (split_rows), to
//   hide the FMA latency; list and index-driven kernels use the same chains,
//   so they are equal bit for bit.
// grad_input += g * filter, scattered into a padded channels-last buffer gxp
//   (one vector per pixel's channels, so the read-modify-writes never partly
//   overlap and stall; a filter row is unrolled at compile time for the common
//   widths).
//
// Memory traffic: per winner and filter row, a few vector loads of the image
// buffer (xp or xcl, a few KB: L1) and, for grad_input, read-modify-writes of
// gxp (L1/L2); the sums stay in registers for a pass over a channel's winners
// and are added to the per-call partial sums once per channel.
// load_channels_last_image reads an image of the input once; weight_grad_cells
// reads a channel's indices and gradients once.
#pragma once

#include <cstdint>
#include <cstring>

#include "backward_lists.h"
#include "simd.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

// grad_weight of one filter row (nq vectors wide): sum over the winners of
// g * the input segment at the winner. Four independent sums hide the FMA
// latency.
template <typename T>
inline void weight_grad_row(const T* xrow, int64_t nq, const int64_t* offs, const T* gvals,
                            int64_t m, T* gw) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  for (int64_t q = 0; q < nq; ++q) {
    const T* xq = xrow + q * L;
    V acc0{}, acc1{}, acc2{}, acc3{};
    int64_t t = 0;
    for (; t + 4 <= m; t += 4) {
      acc0 += splat<V>(gvals[t]) * loadu<V>(xq + offs[t]);
      acc1 += splat<V>(gvals[t + 1]) * loadu<V>(xq + offs[t + 1]);
      acc2 += splat<V>(gvals[t + 2]) * loadu<V>(xq + offs[t + 2]);
      acc3 += splat<V>(gvals[t + 3]) * loadu<V>(xq + offs[t + 3]);
    }
    for (; t < m; ++t) acc0 += splat<V>(gvals[t]) * loadu<V>(xq + offs[t]);
    storeu(gw + q * L, loadu<V>(gw + q * L) + ((acc0 + acc1) + (acc2 + acc3)));
  }
}

// The same for all kh rows of a filter at once when a row fits one vector:
// the kh sums are independent, so one pass over the winners (one broadcast
// of g each) feeds kh FMAs. Winners [0, ma) are chain A, [ma, m) chain B
// (split_rows); their steps are interleaved so the two chains overlap.
constexpr int64_t kMaxKhTile = 8;
template <typename T, int KH, typename O>
inline void weight_grad_rows_tile_kh(const T* xplane, int64_t ws, const O* offs, const T* gvals,
                                     int64_t ma, int64_t m, T* gw, int64_t kwp) {
  using V = typename Simd<T>::V;
  V acc_a[KH], acc_b[KH];
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) acc_a[i] = acc_b[i] = V{};
  const int64_t mb = m - ma;
  const int64_t both = imin(ma, mb);
  const O* offs_b = offs + ma;
  const T* gvals_b = gvals + ma;
  for (int64_t t = 0; t < both; ++t) {
    const V ga = splat<V>(gvals[t]);
    const V gb = splat<V>(gvals_b[t]);
    const T* xa = xplane + offs[t];
    const T* xb = xplane + offs_b[t];
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) {
      acc_a[i] += ga * loadu<V>(xa + i * ws);
      acc_b[i] += gb * loadu<V>(xb + i * ws);
    }
  }
  for (int64_t t = both; t < ma; ++t) {
    const V ga = splat<V>(gvals[t]);
    const T* xa = xplane + offs[t];
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) acc_a[i] += ga * loadu<V>(xa + i * ws);
  }
  for (int64_t t = both; t < mb; ++t) {
    const V gb = splat<V>(gvals_b[t]);
    const T* xb = xplane + offs_b[t];
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) acc_b[i] += gb * loadu<V>(xb + i * ws);
  }
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) {
    storeu(gw + i * kwp, loadu<V>(gw + i * kwp) + (acc_a[i] + acc_b[i]));
  }
}

template <typename T, typename O>
inline void weight_grad_rows_tile(const T* xplane, int64_t ws, int64_t kh, const O* offs,
                                  const T* gvals, int64_t ma, int64_t m, T* gw, int64_t kwp) {
  switch (kh) {
    case 1: return weight_grad_rows_tile_kh<T, 1, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 2: return weight_grad_rows_tile_kh<T, 2, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 3: return weight_grad_rows_tile_kh<T, 3, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 4: return weight_grad_rows_tile_kh<T, 4, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 5: return weight_grad_rows_tile_kh<T, 5, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 6: return weight_grad_rows_tile_kh<T, 6, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 7: return weight_grad_rows_tile_kh<T, 7, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    case 8: return weight_grad_rows_tile_kh<T, 8, O>(xplane, ws, offs, gvals, ma, m, gw, kwp);
    default: break;  // the callers only take this path for kh <= kMaxKhTile
  }
}

// grad_input of one channel's winners: gxp[oh+i][ow+j][:] += g *
// filter[i][j][:] for each winner, a filter row (kw pixels x cinp channels)
// being nw contiguous vectors in both gxp and wco. Per vector one load, one
// FMA, one store; a compile-time nw (the common rows: kw 5 or 3, up to 8
// channels) unrolls the row so no loop counter runs per vector.
template <typename T, int NW>
inline void scatter_rows_nw(T* gxp, int64_t grs, const T* wco, int64_t kh, int64_t nw_rt,
                            const int64_t* pix, int64_t cinp, const T* gvals, int64_t m) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  const int64_t nw = NW > 0 ? NW : nw_rt;
  for (int64_t t = 0; t < m; ++t) {
    const V gv = splat<V>(gvals[t]);
    T* row = gxp + pix[t] * cinp;
    const T* wrow = wco;
    for (int64_t i = 0; i < kh; ++i, row += grs, wrow += nw * L) {
#pragma GCC unroll 16
      for (int64_t e = 0; e < nw; ++e) {
        storeu(row + e * L, loadu<V>(row + e * L) + gv * loadu<V>(wrow + e * L));
      }
    }
  }
}

template <typename T>
inline void scatter_input_grad(T* gxp, int64_t grs, const T* wco, int64_t kh, int64_t nw,
                               const int64_t* pix, int64_t cinp, const T* gvals, int64_t m) {
  switch (nw) {
    case 3: return scatter_rows_nw<T, 3>(gxp, grs, wco, kh, nw, pix, cinp, gvals, m);
    case 5: return scatter_rows_nw<T, 5>(gxp, grs, wco, kh, nw, pix, cinp, gvals, m);
    case 6: return scatter_rows_nw<T, 6>(gxp, grs, wco, kh, nw, pix, cinp, gvals, m);
    case 10: return scatter_rows_nw<T, 10>(gxp, grs, wco, kh, nw, pix, cinp, gvals, m);
    default: return scatter_rows_nw<T, 0>(gxp, grs, wco, kh, nw, pix, cinp, gvals, m);
  }
}

// Zero-padded channels-last copy of image n: xcl[r][c][ci] = input[n][ci][r -
// pad_h][c - pad_w] for r < hp, c < gws, ci < cinp (zero outside the image
// and past cin): the layout of gxp, so that a filter row's input (kw pixels
// x cinp channels) is nw contiguous vectors.
template <typename T>
void load_channels_last_image(const ConvPoolGeometry& g, const T* input, const int64_t* strides,
                              int64_t n, T* xcl, int64_t hp, int64_t gws, int64_t cinp) {
  std::memset(xcl, 0, sizeof(T) * static_cast<size_t>(hp * gws * cinp));
  const int64_t sn = strides[0], sc = strides[1];
  const int64_t sh = strides[2], sw = strides[3];
  const int64_t r_end = imin(hp, g.h + g.pad_h);
  for (int64_t r = g.pad_h; r < r_end; ++r) {
    T* dst = xcl + (r * gws + g.pad_w) * cinp;
    const T* src = input + n * sn + (r - g.pad_h) * sh;
    for (int64_t ci = 0; ci < g.cin; ++ci) {
      for (int64_t c = 0; c < g.w; ++c) dst[c * cinp + ci] = src[ci * sc + c * sw];
    }
  }
}

// grad_weight of one channel from its winner list with the input channels
// in the vector lanes (cin > 1): acc[i][e] += g * xcl[winner row + i][e] for
// the nw vectors e of a filter row, R filter rows per pass over the winners
// (their FMAs are independent and share g's broadcast and the winner's
// offset). Per winner and filter row: nw FMAs, each covering L (kw, ci)
// pairs, instead of one loop over cin of kw-wide rows. The sums are added to
// gwcl[i][e] (layout [kh][nw*L], the caller's per-call partial sum, turned
// into [cin][kh][kw] at the end).
template <typename T, int NW, int R>
inline void weight_grad_cl_rows(const T* xcl, int64_t grs, const int64_t* pix, int64_t cinp,
                                const T* gvals, int64_t m, T* gwcl) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  V acc[R][NW];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int e = 0; e < NW; ++e) acc[r][e] = V{};
  }
  for (int64_t t = 0; t < m; ++t) {
    const V gv = splat<V>(gvals[t]);
    const T* x = xcl + pix[t] * cinp;
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
      for (int e = 0; e < NW; ++e) acc[r][e] += gv * loadu<V>(x + r * grs + e * L);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int e = 0; e < NW; ++e) {
      T* d = gwcl + (r * NW + e) * L;
      storeu(d, loadu<V>(d) + acc[r][e]);
    }
  }
}

template <typename T, int NW>
inline void weight_grad_cl_nw(const T* xcl, int64_t grs, int64_t kh, const int64_t* pix,
                              int64_t cinp, const T* gvals, int64_t m, T* gwcl) {
  constexpr int64_t L = vector_lanes<T>();
  constexpr int R = 2 * NW <= 12 ? 2 : 1;  // accumulators within 16 registers
  int64_t i = 0;
  for (; i + R <= kh; i += R) {
    weight_grad_cl_rows<T, NW, R>(xcl + i * grs, grs, pix, cinp, gvals, m, gwcl + i * NW * L);
  }
  for (; i < kh; ++i) {
    weight_grad_cl_rows<T, NW, 1>(xcl + i * grs, grs, pix, cinp, gvals, m, gwcl + i * NW * L);
  }
}

// grad_weight (as weight_grad_cl, the same sums) and grad_input (as
// scatter_input_grad) of one channel in one pass over its winners, filter row
// by filter row: the row's nw weight vectors stay in registers for the whole
// pass and each winner's step loads its g and offset once for both. Per
// winner and filter row: nw FMAs into the grad_weight sums and nw
// read-modify-writes of gxp (whose FMAs take the weights from registers).
template <typename T, int NW>
inline void weight_and_input_grad_cl(const T* xcl, T* gxp, int64_t grs, int64_t kh, const T* wco,
                                     const int64_t* pix, int64_t cinp, const T* gvals, int64_t m,
                                     T* gwcl) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  for (int64_t i = 0; i < kh; ++i) {
    V acc[NW], w[NW];
#pragma GCC unroll 16
    for (int e = 0; e < NW; ++e) {
      acc[e] = V{};
      w[e] = loadu<V>(wco + (i * NW + e) * L);
    }
    for (int64_t t = 0; t < m; ++t) {
      const V gv = splat<V>(gvals[t]);
      const int64_t o = pix[t] * cinp + i * grs;
      const T* x = xcl + o;
      T* d = gxp + o;
#pragma GCC unroll 16
      for (int e = 0; e < NW; ++e) {
        acc[e] += gv * loadu<V>(x + e * L);
        storeu(d + e * L, loadu<V>(d + e * L) + gv * w[e]);
      }
    }
#pragma GCC unroll 16
    for (int e = 0; e < NW; ++e) {
      T* dst = gwcl + (i * NW + e) * L;
      storeu(dst, loadu<V>(dst) + acc[e]);
    }
  }
}

// The widths with a compiled one-pass kernel (weights and sums within 16
// registers); false: separate passes.
inline bool weight_and_input_grad_cl_supported(int64_t nw) { return nw == 3 || nw == 5 || nw == 6; }

template <typename T>
inline void weight_and_input_grad(const T* xcl, T* gxp, int64_t grs, int64_t kh, int64_t nw,
                                  const T* wco, const int64_t* pix, int64_t cinp, const T* gvals,
                                  int64_t m, T* gwcl) {
  switch (nw) {
    case 3:
      return weight_and_input_grad_cl<T, 3>(xcl, gxp, grs, kh, wco, pix, cinp, gvals, m, gwcl);
    case 5:
      return weight_and_input_grad_cl<T, 5>(xcl, gxp, grs, kh, wco, pix, cinp, gvals, m, gwcl);
    case 6:
      return weight_and_input_grad_cl<T, 6>(xcl, gxp, grs, kh, wco, pix, cinp, gvals, m, gwcl);
    default: break;  // not taken: weight_and_input_grad_cl_supported
  }
}

// The filter-row widths (in vectors) with a compiled kernel; others use the
// planar winner-list path.
inline bool weight_grad_cl_supported(int64_t nw) {
  return nw == 1 || nw == 2 || nw == 3 || nw == 4 || nw == 5 || nw == 6 || nw == 10;
}

template <typename T>
inline void weight_grad_cl(const T* xcl, int64_t grs, int64_t kh, int64_t nw, const int64_t* pix,
                           int64_t cinp, const T* gvals, int64_t m, T* gwcl) {
#define FMNIST_CL_CASE(NW) \
  case NW: return weight_grad_cl_nw<T, NW>(xcl, grs, kh, pix, cinp, gvals, m, gwcl);
  switch (nw) {
    FMNIST_CL_CASE(1)
    FMNIST_CL_CASE(2)
    FMNIST_CL_CASE(3)
    FMNIST_CL_CASE(4)
    FMNIST_CL_CASE(5)
    FMNIST_CL_CASE(6)
    FMNIST_CL_CASE(10)
    default: break;  // not taken: weight_grad_cl_supported
  }
#undef FMNIST_CL_CASE
}

// One window of the index-driven path: acc[i] += g * input row i at the
// winner (a window without one reads the zero rows with g = +0 and adds +0).
template <typename T, int KH>
inline void cell_step(const T* xplane, int64_t ws, int64_t corner, const WinnerCode& c, T g,
                      typename Simd<T>::V* acc) {
  using V = typename Simd<T>::V;
  const T gs = masked(g, c.keep);
  const V gv = splat<V>(gs);
  const T* x = xplane + ((corner & c.keep) + c.off);
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) acc[i] += gv * loadu<V>(x + i * ws);
}

// grad_weight of one channel x one input channel straight
// from the saved indices, with no winner list, when no grad_input is asked
// for and a filter row fits one vector (the model's first block): every pool
// window of the channel is visited once, chains A and B (split_rows) side by
// side, a row of A with the matching row of B. The sums equal the winner
// list's (weight_grad_rows_tile_kh: same chains, same order, the windows
// without a winner adding +0). This saves the list's separate pass (a store
// and a reload per window) and its loop-carried length.
// Per window: one index load, one table load, ~5 integer ops, kh FMAs with
// their loads; xp and the table stay in L1.
template <typename T, typename I, int KH>
inline void weight_grad_cells_kh(const T* xplane, int64_t ws, const I* ind, const T* grad,
                                 int64_t ph_n, int64_t pw_n, int64_t pool, int32_t no_grad,
                                 const WinnerCode* code, T* gw, int64_t kwp) {
  using V = typename Simd<T>::V;
  V acc_a[KH], acc_b[KH];
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) acc_a[i] = acc_b[i] = V{};
  const int64_t split = split_rows(ph_n);
  for (int64_t ra = 0; ra < split; ++ra) {
    const int64_t rb = ra + split;
    const I* ind_a = ind + ra * pw_n;
    const T* grad_a = grad + ra * pw_n;
    int64_t corner_a = ra * pool * ws;
    if (rb < ph_n) {
      const I* ind_b = ind + rb * pw_n;
      const T* grad_b = grad + rb * pw_n;
      int64_t corner_b = rb * pool * ws;
      for (int64_t pw = 0; pw < pw_n; ++pw, corner_a += pool, corner_b += pool) {
        cell_step<T, KH>(xplane, ws, corner_a, code[code_index(ind_a[pw], no_grad)], grad_a[pw],
                         acc_a);
        cell_step<T, KH>(xplane, ws, corner_b, code[code_index(ind_b[pw], no_grad)], grad_b[pw],
                         acc_b);
      }
    } else {  // the last row of an odd count: chain A alone
      for (int64_t pw = 0; pw < pw_n; ++pw, corner_a += pool) {
        cell_step<T, KH>(xplane, ws, corner_a, code[code_index(ind_a[pw], no_grad)], grad_a[pw],
                         acc_a);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) {
    storeu(gw + i * kwp, loadu<V>(gw + i * kwp) + (acc_a[i] + acc_b[i]));
  }
}

template <typename T, typename I>
inline void weight_grad_cells(const T* xplane, int64_t ws, int64_t kh, const I* ind, const T* grad,
                              int64_t ph_n, int64_t pw_n, int64_t pool, int32_t no_grad,
                              const WinnerCode* code, T* gw, int64_t kwp) {
#define FMNIST_CELLS_CASE(KH)                                                                     \
  case KH:                                                                                        \
    return weight_grad_cells_kh<T, I, KH>(xplane, ws, ind, grad, ph_n, pw_n, pool, no_grad, code, \
                                          gw, kwp);
  switch (kh) {
    FMNIST_CELLS_CASE(1)
    FMNIST_CELLS_CASE(2)
    FMNIST_CELLS_CASE(3)
    FMNIST_CELLS_CASE(4)
    FMNIST_CELLS_CASE(5)
    FMNIST_CELLS_CASE(6)
    FMNIST_CELLS_CASE(7)
    FMNIST_CELLS_CASE(8)
    default: break;  // the caller only takes this path for kh <= kMaxKhTile
  }
#undef FMNIST_CELLS_CASE
}

}  // namespace
}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
