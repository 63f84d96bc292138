// The forward of the CPU kernels: convolution in register tiles, ReLU and
// max-pool, for a range of images (forward_images). Part of one
// instruction-set build (kernels.h: compiled once per ISA, internal linkage,
// no ATen/c10 headers); the ISA's isa_*.cpp sets the register blocking.
//
// Per image:
//   1. without padding, with unit column stride and rows wide enough for the
//      vector loads (the model's blocks), read the image in place; otherwise
//      copy it (any strides: NCHW, channels_last, sliced) into a
//      zero-padded buffer xp[cin][hp][ws] whose rows are long enough that
//      every vector load below stays inside it (a few KB: L1-resident).
//   2. for each block of output channels and each pooled row, compute the
//      `pool` convolution rows it needs in register tiles: per filter tap one
//      unaligned load per vector and one broadcast per channel feed
//      channels x vectors FMAs. The weights are pre-arranged as
//      [block][cin][kh][kw][channels]. Two tile shapes (choose_tiles): wide
//      (kCob channels x up to kNv vectors of one row) and row pairs (kCob2
//      channels x 2 rows x 1 vector); the one with fewer padded channels wins
//      (AVX2: 6-channel row pairs for the model's 6 and 12 channels, where
//      4-channel blocks computed 8 channels for block 1's 6).
//   3. ReLU + max-pool, writing the output and the uint8 winner index. Row
//      pairs with pool 2 pool in the tile's registers (even/odd lanes of the
//      two rows are a window's four values); other tiles go through a small
//      row buffer. The un-pooled convolution output is never written to
//      memory beyond `pool` rows of one channel block.
// Memory traffic: read the input once, write out + indices once (1/pool^2
// of the convolution size, plus a quarter of that for uint8 indices).
#pragma once

#include <cstdint>
#include <cstring>

#include "simd.h"

#if !defined(FMNIST_COB) || !defined(FMNIST_NV) || !defined(FMNIST_COB2)
#error "define FMNIST_COB, FMNIST_NV and FMNIST_COB2 (the register blocking) before kernels.h"
#endif

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

constexpr int kCob = FMNIST_COB;    // output channels per wide register tile
constexpr int kNv = FMNIST_NV;      // max 32-byte column vectors per wide tile
constexpr int kCob2 = FMNIST_COB2;  // output channels per row-pair tile (2 rows x 1 vector)

// A tile of NR convolution rows x NV column vectors for COB channels:
//   dst[c][r][v*L + x] = bias[c] + sum_{ci,i,j} wt[ci][i][j][c] * xrow[ci][r + i][v*L + x + j]
// All COB*NR*NV accumulators live in registers; per filter tap the tile
// costs NR*NV input loads and COB broadcasts for COB*NR*NV FMAs.
template <typename T, int COB, int NR, int NV, int KW>
__attribute__((always_inline)) inline void conv_accumulate(
    const T* xrow, int64_t ws, int64_t plane, int64_t cin, int64_t kh, int64_t kw_rt, const T* wt,
    const T* bt, typename Simd<T>::V (&acc)[COB][NR][NV]) {
  const int64_t kw = KW > 0 ? KW : kw_rt;  // compile-time width unrolls the taps
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
#pragma GCC unroll 16
  for (int c = 0; c < COB; ++c) {
    const V b = splat<V>(bt[c]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[c][r][v] = b;
    }
  }
  for (int64_t ci = 0; ci < cin; ++ci) {
    for (int64_t i = 0; i < kh; ++i) {
      const T* row = xrow + ci * plane + i * ws;
#pragma GCC unroll 8
      for (int64_t j = 0; j < kw; ++j) {
        V x[NR][NV];
#pragma GCC unroll 4
        for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v) x[r][v] = loadu<V>(row + r * ws + j + v * L);
        }
#pragma GCC unroll 16
        for (int c = 0; c < COB; ++c) {
          const V wv = splat<V>(wt[c]);
#pragma GCC unroll 4
          for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
            for (int v = 0; v < NV; ++v) acc[c][r][v] += wv * x[r][v];
          }
        }
        wt += COB;
      }
    }
  }
}

template <typename T, int COB, int NR, int NV, int KW>
inline void conv_tile(const T* xrow, int64_t ws, int64_t plane, int64_t cin, int64_t kh,
                      int64_t kw_rt, const T* wt, const T* bt, T* dst, int64_t dst_rstride,
                      int64_t dst_cstride) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  V acc[COB][NR][NV];
  conv_accumulate<T, COB, NR, NV, KW>(xrow, ws, plane, cin, kh, kw_rt, wt, bt, acc);
#pragma GCC unroll 16
  for (int c = 0; c < COB; ++c) {
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        storeu(dst + c * dst_cstride + r * dst_rstride + v * L, acc[c][r][v]);
      }
    }
  }
}

// out[0, valid) = res's first lanes, idx[0, valid) = j's (narrowed to I):
// whole vectors where all L lanes are valid, else half a vector and the rest
// one by one (never past `valid`: the next row may already be written).
template <typename T, typename I, typename V, typename M>
inline void store_lanes(T* out, I* idx, V res, M j, int64_t valid) {
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(T));  // a whole or a half vector
  typedef I IV __attribute__((vector_size(L * sizeof(I))));
  const IV jn = __builtin_convertvector(j, IV);
  int64_t x = 0;
  if (valid == L) {
    storeu(out, res);
    storeu(idx, jn);
    return;
  }
  if (valid >= L / 2) {
    __builtin_memcpy(out, &res, sizeof(T) * (L / 2));
    __builtin_memcpy(idx, &jn, sizeof(I) * (L / 2));
    x = L / 2;
  }
  for (; x < valid; ++x) {
    out[x] = res[x];
    idx[x] = jn[x];
  }
}

// A row-pair tile with the 2x2 max-pool done in registers: the two
// convolution rows of one pooled row, one vector (L columns = L/2 pool
// windows) wide, COB channels. Each window's four values are the even and odd
// lanes of the two rows, scanned in window order with the rule of
// pool_takes / pool_output / pool_saved_index (index_math.h), lane-wise, as
// pool_rows_2 does; the first `cvalid` channels' `valid` windows are written
// to out/idx (channel c at c * out_cstride). No row buffer: the convolution
// output never leaves the registers.
template <typename T, typename I, int COB, int KW>
inline void conv_pool2_tile(const T* xrow, int64_t ws, int64_t plane, int64_t cin, int64_t kh,
                            int64_t kw_rt, const T* wt, const T* bt, T* out, I* idx,
                            int64_t out_cstride, int64_t cvalid, int64_t valid) {
  using V = typename Simd<T>::V;
  constexpr int H = static_cast<int>(vector_lanes<T>()) / 2;  // pool windows per vector
  typedef T HV __attribute__((vector_size(16)));
  typedef typename Simd<T>::MElem HM __attribute__((vector_size(16)));
  V acc[COB][2][1];
  conv_accumulate<T, COB, 2, 1, KW>(xrow, ws, plane, cin, kh, kw_rt, wt, bt, acc);
  const HV zero{};
  const HM no_grad = HM{} + static_cast<typename Simd<T>::MElem>(no_grad_index(2));
#pragma GCC unroll 16
  for (int c = 0; c < COB; ++c) {
    if (c >= cvalid) break;
    HV v[4];  // window positions 0..3: (row 0, even), (row 0, odd), (row 1, even), (row 1, odd)
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      const V a = acc[c][r][0];
      if constexpr (H == 4) {
        v[2 * r] = __builtin_shufflevector(a, a, 0, 2, 4, 6);
        v[2 * r + 1] = __builtin_shufflevector(a, a, 1, 3, 5, 7);
      } else {
        v[2 * r] = __builtin_shufflevector(a, a, 0, 2);
        v[2 * r + 1] = __builtin_shufflevector(a, a, 1, 3);
      }
    }
    // Starting from position 0 equals scanning from -inf: position 0 is
    // taken unless it is -inf, and then best stays -inf with index 0.
    HV best = v[0];
    HM best_j{};
#pragma GCC unroll 3
    for (int j = 1; j < 4; ++j) {
      const HM take = (v[j] > best) | (v[j] != v[j]);
      best = take ? v[j] : best;
      best_j = take ? (HM{} + j) : best_j;
    }
    const HM pass = ~(best <= zero);  // > 0 or NaN
    const HV res = pass ? best : zero;
    const HM j = pass ? best_j : no_grad;
    store_lanes(out + c * out_cstride, idx + c * out_cstride, res, j, valid);
  }
}

// How the forward tiles the convolution: `cob` output channels per block
// (the weights are arranged for it), and either
//   wide tiles (kCob channels): one row of up to kNv vectors, or two rows of
//     one vector when a row is one vector wide; or
//   row-pair tiles (kCob2 channels): two rows of one vector (a last odd row:
//     one row of up to two vectors).
// choose_tiles takes the one that computes fewer padded channels (kCob = 4
// on AVX2 computes 8 for the model's 6-channel block 1, a quarter wasted),
// and on a tie the one with more accumulators (more FMAs per load).
struct TilePlan {
  int cob;
  bool row_pairs;
};

inline TilePlan choose_tiles(int64_t cout, int64_t nvec) {
  const int64_t slots_wide = round_up(cout, int64_t{kCob});
  const int64_t slots_pairs = round_up(cout, int64_t{kCob2});
  const int64_t acc_wide = kCob * (nvec == 1 ? 2 : imin(nvec, int64_t{kNv}));
  const int64_t acc_pairs = 2 * kCob2;
  if (slots_pairs < slots_wide || (slots_pairs == slots_wide && acc_pairs > acc_wide)) {
    return {kCob2, true};
  }
  return {kCob, false};
}

// The convolution rows [oh, oh + nrows) of one channel block, into
// dst[c][r][...], with the tiles of TilePlan (COB = its cob).
template <typename T, int COB, bool kRowPairs, int KW>
void conv_rows_kw(const T* xp, int64_t oh, int64_t nrows, int64_t nvec, int64_t ws, int64_t plane,
                  int64_t cin, int64_t kh, int64_t kw, const T* wt, const T* bt, T* dst, int64_t rs,
                  int64_t dst_cstride) {
  constexpr int64_t L = vector_lanes<T>();
  int64_t r = 0;
  if constexpr (kRowPairs) {
    for (; r + 2 <= nrows; r += 2) {
      const T* x = xp + (oh + r) * ws;
      for (int64_t v = 0; v < nvec; ++v) {
        conv_tile<T, COB, 2, 1, KW>(x + v * L, ws, plane, cin, kh, kw, wt, bt, dst + r * rs + v * L,
                                    rs, dst_cstride);
      }
    }
    for (; r < nrows; ++r) {
      const T* x = xp + (oh + r) * ws;
      int64_t v = 0;
      for (; v + 2 <= nvec; v += 2) {
        conv_tile<T, COB, 1, 2, KW>(x + v * L, ws, plane, cin, kh, kw, wt, bt, dst + r * rs + v * L,
                                    rs, dst_cstride);
      }
      if (v < nvec) {
        conv_tile<T, COB, 1, 1, KW>(x + v * L, ws, plane, cin, kh, kw, wt, bt, dst + r * rs + v * L,
                                    rs, dst_cstride);
      }
    }
    return;
  }
  if (nvec == 1) {
    for (; r + 2 <= nrows; r += 2) {
      conv_tile<T, COB, 2, 1, KW>(xp + (oh + r) * ws, ws, plane, cin, kh, kw, wt, bt, dst + r * rs,
                                  rs, dst_cstride);
    }
  }
  for (; r < nrows; ++r) {
    const T* x = xp + (oh + r) * ws;
    T* d = dst + r * rs;
    int64_t v0 = 0;
    for (; v0 + kNv <= nvec; v0 += kNv) {
      conv_tile<T, COB, 1, kNv, KW>(x + v0 * L, ws, plane, cin, kh, kw, wt, bt, d + v0 * L, rs,
                                    dst_cstride);
    }
    const int64_t rest = nvec - v0;
    if (rest >= 2 && kNv > 2) {
      conv_tile<T, COB, 1, 2, KW>(x + v0 * L, ws, plane, cin, kh, kw, wt, bt, d + v0 * L, rs,
                                  dst_cstride);
      v0 += 2;
    } else if (rest >= 1) {
      conv_tile<T, COB, 1, 1, KW>(x + v0 * L, ws, plane, cin, kh, kw, wt, bt, d + v0 * L, rs,
                                  dst_cstride);
      v0 += 1;
    }
    if (v0 < nvec) {
      conv_tile<T, COB, 1, 1, KW>(x + v0 * L, ws, plane, cin, kh, kw, wt, bt, d + v0 * L, rs,
                                  dst_cstride);
    }
  }
}

// All pooled rows of one kCob2 channel block with pool 2 and row-pair tiles:
// per pooled row, one conv_pool2_tile per vector of convolution columns;
// out/idx point at the block's first channel ([c][ph][pw] planes).
template <typename T, typename I, int KW>
void conv_pool2_rows_kw(const T* xp, int64_t nvec, int64_t ws, int64_t plane,
                        const ConvPoolGeometry& g, const T* wt, const T* bt, int64_t cvalid, T* out,
                        I* idx) {
  constexpr int64_t L = vector_lanes<T>();
  const int64_t cstride = g.ph * g.pw;
  for (int64_t ph = 0; ph < g.ph; ++ph) {
    const T* x = xp + 2 * ph * ws;
    for (int64_t v = 0; v < nvec; ++v) {
      const int64_t q0 = v * (L / 2);
      conv_pool2_tile<T, I, kCob2, KW>(x + v * L, ws, plane, g.cin, g.kh, g.kw, wt, bt,
                                       out + ph * g.pw + q0, idx + ph * g.pw + q0, cstride, cvalid,
                                       imin(L / 2, g.pw - q0));
    }
  }
}

template <typename T, typename I>
void conv_pool2_rows(const T* xp, int64_t nvec, int64_t ws, int64_t plane,
                     const ConvPoolGeometry& g, const T* wt, const T* bt, int64_t cvalid, T* out,
                     I* idx) {
  if (g.kw == 5) {
    conv_pool2_rows_kw<T, I, 5>(xp, nvec, ws, plane, g, wt, bt, cvalid, out, idx);
  } else if (g.kw == 3) {
    conv_pool2_rows_kw<T, I, 3>(xp, nvec, ws, plane, g, wt, bt, cvalid, out, idx);
  } else {
    conv_pool2_rows_kw<T, I, 0>(xp, nvec, ws, plane, g, wt, bt, cvalid, out, idx);
  }
}

// Filter widths of 3 and 5 (the common ones) get fully unrolled tap loops.
template <typename T, int COB, bool kRowPairs>
void conv_rows_plan(const T* xp, int64_t oh, int64_t nrows, int64_t nvec, int64_t ws, int64_t plane,
                    int64_t cin, int64_t kh, int64_t kw, const T* wt, const T* bt, T* dst,
                    int64_t rs, int64_t dst_cstride) {
  if (kw == 5) {
    conv_rows_kw<T, COB, kRowPairs, 5>(xp, oh, nrows, nvec, ws, plane, cin, kh, kw, wt, bt, dst, rs,
                                       dst_cstride);
  } else if (kw == 3) {
    conv_rows_kw<T, COB, kRowPairs, 3>(xp, oh, nrows, nvec, ws, plane, cin, kh, kw, wt, bt, dst, rs,
                                       dst_cstride);
  } else {
    conv_rows_kw<T, COB, kRowPairs, 0>(xp, oh, nrows, nvec, ws, plane, cin, kh, kw, wt, bt, dst, rs,
                                       dst_cstride);
  }
}

template <typename T>
void conv_rows(const TilePlan& plan, const T* xp, int64_t oh, int64_t nrows, int64_t nvec,
               int64_t ws, int64_t plane, int64_t cin, int64_t kh, int64_t kw, const T* wt,
               const T* bt, T* dst, int64_t rs, int64_t dst_cstride) {
  if (plan.row_pairs) {
    conv_rows_plan<T, kCob2, true>(xp, oh, nrows, nvec, ws, plane, cin, kh, kw, wt, bt, dst, rs,
                                   dst_cstride);
  } else {
    conv_rows_plan<T, kCob, false>(xp, oh, nrows, nvec, ws, plane, cin, kh, kw, wt, bt, dst, rs,
                                   dst_cstride);
  }
}

// pool == 2, the common case, with explicit vectors: each pair of vectors of
// a convolution row is split into even and odd columns, which are the left
// and right halves of L consecutive pool windows; the four window positions
// are then scanned in order for L windows at once (the rule of pool_takes /
// pool_output / pool_saved_index in index_math.h, lane-wise). Reads up to 2L columns
// past `pw * 2` (the row buffer has that slack); lanes past pw are dropped.
template <typename T, typename I>
inline void pool_rows_2(const T* src, int64_t rs, int64_t pw, T* out, I* idx) {
  using V = typename Simd<T>::V;
  using M = typename Simd<T>::M;
  constexpr int64_t L = vector_lanes<T>();
  const V zero{};
  const M no_grad = M{} + static_cast<typename Simd<T>::MElem>(no_grad_index(2));
  for (int64_t q0 = 0; q0 < pw; q0 += L) {
    V best = zero - static_cast<T>(__builtin_huge_val());
    M best_j{};
    for (int r = 0; r < 2; ++r) {
      const V a = loadu<V>(src + r * rs + 2 * q0);
      const V b = loadu<V>(src + r * rs + 2 * q0 + L);
      V even, odd;
      if constexpr (L == 8) {
        even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14);
        odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15);
      } else {
        even = __builtin_shufflevector(a, b, 0, 2, 4, 6);
        odd = __builtin_shufflevector(a, b, 1, 3, 5, 7);
      }
      M take = (even > best) | (even != even);
      best = take ? even : best;
      best_j = take ? (M{} + 2 * r) : best_j;
      take = (odd > best) | (odd != odd);
      best = take ? odd : best;
      best_j = take ? (M{} + 2 * r + 1) : best_j;
    }
    const M pass = ~(best <= zero);  // > 0 or NaN
    const V res = pass ? best : zero;
    const M j = pass ? best_j : no_grad;
    store_lanes(out + q0, idx + q0, res, j, imin(L, pw - q0));
  }
}

// Max-pool `pool` convolution rows of one channel into `pw` outputs with the
// scan rule of index_math.h; the loops over q are branch-free so the
// compiler can vectorize them.
template <typename T, typename I>
inline void pool_rows(const T* src, int64_t rs, int64_t pool, int64_t pw, T* best, int32_t* best_j,
                      T* out, I* idx) {
  const T neg_inf = -static_cast<T>(__builtin_huge_val());
  for (int64_t q = 0; q < pw; ++q) {
    best[q] = neg_inf;
    best_j[q] = 0;
  }
  for (int64_t r = 0; r < pool; ++r) {
    for (int64_t s = 0; s < pool; ++s) {
      const T* col = src + r * rs + s;
      const int32_t j = static_cast<int32_t>(r * pool + s);
      for (int64_t q = 0; q < pw; ++q) {
        const T v = col[q * pool];
        const bool take = pool_takes(v, best[q]);
        best[q] = take ? v : best[q];
        best_j[q] = take ? j : best_j[q];
      }
    }
  }
  for (int64_t q = 0; q < pw; ++q) {
    out[q] = pool_output(best[q]);
    idx[q] = static_cast<I>(pool_saved_index(best[q], best_j[q], pool));
  }
}

}  // namespace

template <typename T, typename I>
void forward_images(const ForwardArgs<T, I>& a, int64_t n0, int64_t n1) {
  const ConvPoolGeometry& g = a.g;
  constexpr int64_t L = vector_lanes<T>();
  const int64_t pool = g.pool;
  const int64_t owu = g.pw * pool;  // convolution columns that reach the pool
  const int64_t ohu = g.ph * pool;  // convolution rows that reach the pool
  const int64_t nvec = ceil_div(owu, L);
  const int64_t hp = ohu + g.kh - 1;
  const int64_t ws = imax(g.w + 2 * g.pad_w, nvec * L + g.kw - 1);
  const int64_t plane = hp * ws;
  const TilePlan plan = choose_tiles(g.cout, nvec);
  const int64_t cob = plan.cob;
  const int64_t ncb = ceil_div(g.cout, cob);
  const int64_t taps = g.cin * g.kh * g.kw;
  const int64_t rs = nvec * L;  // row-buffer stride

  const int64_t xp_size = g.cin * plane;
  const int64_t wt_size = ncb * taps * cob;
  const int64_t bt_size = ncb * cob;
  const int64_t rows_size = cob * pool * rs + 2 * L;  // slack: pool_rows_2
  Scratch<T> scratch(xp_size + wt_size + bt_size + rows_size + g.pw);
  Scratch<int32_t> best_j_scratch(g.pw);
  int32_t* best_j = best_j_scratch.p;
  T* xp = scratch.p;
  T* wt = xp + xp_size;
  T* bt = wt + wt_size;
  T* rows = bt + bt_size;
  T* best = rows + rows_size;

  // Weights as [block][cin][kh][kw][cob], zero-padded past cout.
  for (int64_t cb = 0; cb < ncb; ++cb) {
    for (int64_t t = 0; t < taps; ++t) {
      for (int64_t c = 0; c < cob; ++c) {
        const int64_t co = cb * cob + c;
        wt[(cb * taps + t) * cob + c] = co < g.cout ? a.weight[co * taps + t] : T(0);
      }
    }
  }
  for (int64_t co = 0; co < ncb * cob; ++co) {
    bt[co] = (co < g.cout && a.bias) ? a.bias[co] : T(0);
  }

  // Without padding, with unit column stride and rows wide enough for every
  // vector load (the model's two blocks: 28 >= 3*8 + 4, 12 >= 8 + 4), the
  // tiles read the input where it is: no copy.
  const int64_t sw = a.input_strides[3];
  const bool in_place = g.pad_h == 0 && g.pad_w == 0 && sw == 1 && g.w >= nvec * L + g.kw - 1;

  for (int64_t n = n0; n < n1; ++n) {
    const T* x = xp;  // the image as the tiles read it: row stride xws, channel stride xplane
    int64_t xws = ws, xplane = plane;
    if (in_place) {
      x = a.input + n * a.input_strides[0];
      xws = a.input_strides[2];
      xplane = a.input_strides[1];
    } else {
      load_padded_image(g, a.input, a.input_strides, n, xp, hp, ws);
    }
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const T* wcb = wt + cb * taps * cob;
      const T* bcb = bt + cb * cob;
      const int64_t cvalid = imin(cob, g.cout - cb * cob);
      if (plan.row_pairs && pool == 2) {
        conv_pool2_rows<T, I>(x, nvec, xws, xplane, g, wcb, bcb, cvalid,
                              a.out + (n * g.cout + cb * cob) * g.ph * g.pw,
                              a.indices + (n * g.cout + cb * cob) * g.ph * g.pw);
        continue;
      }
      for (int64_t ph = 0; ph < g.ph; ++ph) {
        conv_rows(plan, x, ph * pool, pool, nvec, xws, xplane, g.cin, g.kh, g.kw, wcb, bcb, rows,
                  rs, pool * rs);
        // ReLU + max-pool the `pool` rows of each channel of the block.
        for (int64_t c = 0; c < cvalid; ++c) {
          const int64_t o = ((n * g.cout + cb * cob + c) * g.ph + ph) * g.pw;
          if (pool == 2) {
            pool_rows_2<T, I>(rows + c * pool * rs, rs, g.pw, a.out + o, a.indices + o);
          } else {
            pool_rows(rows + c * pool * rs, rs, pool, g.pw, best, best_j, a.out + o, a.indices + o);
          }
        }
      }
    }
  }
}

}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
