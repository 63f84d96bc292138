// CPU kernels of conv_relu_maxpool2d, forward and backward.
//
// This header is compiled once per instruction set (isa_default.cpp,
// isa_avx2.cpp, isa_avx512.cpp define FMNIST_ISA and the register blocking);
// the op picks the best build the CPU supports at run time. It includes no
// ATen/c10 header and defines everything with internal linkage, so no inline
// code compiled with wider instructions can leak into the rest of the library.
//
// Parallel decomposition: the caller splits the batch across threads
// (at::parallel_for); each call here processes a contiguous range of images
// with private scratch, so there is no synchronisation inside.
//
// Forward, per image:
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
//   Memory traffic: read the input once, write out + indices once (1/pool^2
//   of the convolution size, plus a quarter of that for uint8 indices).
//
// Backward, per image (only for the outputs asked for):
//   For each output channel, gather the pool windows that pass a gradient
//   (index != no-gradient marker) into a short list of (offset, gradient),
//   without branches; every other convolution position is skipped.
//   grad_bias   += sum of the gradients of the windows with a winner, in
//                  vector lanes over all the channel's windows (the others
//                  masked to +0), the same way on every path.
//   grad_weight += g * input patch, accumulated over the list in registers,
//                  then added to a private partial sum; the caller adds the
//                  partials of all workers (no atomics). Two layouts:
//                  - several input channels (the model's block 2): the
//                    input copied channels last, [hp][gws][cinp] like gxp
//                    below, so a filter row's input is a few whole vectors
//                    (kw pixels x cinp channels) and one FMA covers L
//                    (column, channel) pairs; summed over the call's images
//                    in that layout, transposed into the partial at the end
//                    (weight_grad_cl). With grad_input asked for too, both
//                    run in one pass over the winners per filter row, the
//                    row's weights in registers (weight_and_input_grad_cl).
//                  - otherwise planar rows, one vector covering a filter row.
//                    A first layer (one input channel, no grad_input asked
//                    for, filter rows of one vector, kh <= 8: the model's
//                    block 1) skips the list: every window is visited, a
//                    window without a winner reading zero rows below the
//                    image with g = +0. For pool 2 a vectorized pass decodes
//                    the channel's windows first (decode_windows_pool2),
//                    otherwise a table decodes each index (weight_grad_cells).
//                  Planar sums over windows run as two chains side by side
//                  (split_rows), to hide the FMA latency; list and
//                  index-driven paths use the same chains, so they are equal.
//   grad_input  += g * filter, scattered into a padded channels-last buffer
//                  for the image (one vector per pixel's channels, so the
//                  read-modify-writes never partly overlap and stall; a
//                  filter row is unrolled at compile time for the common
//                  widths), then copied out to NCHW without the padding.
//   Memory traffic: read input, grad_out and indices once, write grad_input
//   once; the weights, the image buffers and partial sums stay in L1/L2.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>

#include "../host_device.h"
#include "../index_math.h"
#include "isa.h"

#if !defined(FMNIST_ISA) || !defined(FMNIST_COB) || !defined(FMNIST_NV) || !defined(FMNIST_COB2)
#error "define FMNIST_ISA, FMNIST_COB, FMNIST_NV and FMNIST_COB2 before including kernels_impl.h"
#endif

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

constexpr int kCob = FMNIST_COB;    // output channels per wide register tile
constexpr int kNv = FMNIST_NV;      // max 32-byte column vectors per wide tile
constexpr int kCob2 = FMNIST_COB2;  // output channels per row-pair tile (2 rows x 1 vector)

// 32-byte SIMD vectors through the GCC/Clang vector extension: the compiler
// emits AVX/AVX-512VL instructions where this file is compiled for them and
// pairs of SSE2 instructions otherwise.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t M __attribute__((vector_size(32)));
  typedef int32_t MElem;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t M __attribute__((vector_size(32)));
  typedef int64_t MElem;
};

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename T, typename V>
inline void storeu(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
inline V splat(T s) {
  if constexpr (vector_lanes<T>() == 8) {
    return V{s, s, s, s, s, s, s, s};
  } else {
    return V{s, s, s, s};
  }
}

// Scratch memory for one call, released on scope exit. The sizes are small
// (a few images' worth), so one allocation per call is enough.
template <typename T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    // 64-byte aligned, so vectors at multiples of 32 bytes never split a cache line.
    const size_t bytes = round_up(sizeof(T) * static_cast<size_t>(imax(n, 1)) + 64, size_t{64});
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Zero-padded copy of image n: xp[ci][r][c] = input[n][ci][r - pad_h][c - pad_w]
// for r < hp, c < ws (zero outside the image); `strides` are input's (N, C,
// H, W) strides.
template <typename T>
void load_padded_image(const ConvPoolGeometry& g, const T* input, const int64_t* strides, int64_t n,
                       T* xp, int64_t hp, int64_t ws) {
  std::memset(xp, 0, sizeof(T) * static_cast<size_t>(g.cin * hp * ws));
  const int64_t sn = strides[0], sc = strides[1];
  const int64_t sh = strides[2], sw = strides[3];
  const int64_t r_end = imin(hp, g.h + g.pad_h);
  for (int64_t ci = 0; ci < g.cin; ++ci) {
    const T* src_c = input + n * sn + ci * sc;
    T* dst_c = xp + ci * hp * ws;
    for (int64_t r = g.pad_h; r < r_end; ++r) {
      const T* src = src_c + (r - g.pad_h) * sh;
      T* dst = dst_c + r * ws + g.pad_w;
      if (sw == 1) {
        std::memcpy(dst, src, sizeof(T) * static_cast<size_t>(g.w));
      } else {
        for (int64_t c = 0; c < g.w; ++c) dst[c] = src[c * sw];
      }
    }
  }
}

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

// The pool windows of a channel are summed in two chains that run side by
// side: chain A over the pool rows [0, split_rows(ph)), chain B over the rest,
// each in scan order, then A + B. The two chains hide the FMA (and add)
// latency that a single running sum waits on per window; the winner list and
// the index-driven path below use this same association, so their sums are
// equal bit for bit (a window without a winner adds exactly +0).
inline int64_t split_rows(int64_t ph_n) { return (ph_n + 1) / 2; }

// The same for all kh rows of a filter at once when a row fits one vector:
// the kh sums are independent, so one pass over the winners (one broadcast
// of g each) feeds kh FMAs. Winners [0, ma) are chain A, [ma, m) chain B;
// their steps are interleaved so the two chains overlap.
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

// The pool windows of one channel that pass a gradient, as a list of
// (offset of the winner in xp, [its pixel in gxp,] gradient); returns the
// list's length. Branch-free: every window's entry is written at the list's
// end and the end moves on only for a winner, so the unpredictable "passes a
// gradient?" test costs no mispredicted branch, and the offsets are carried
// along the rows instead of recomputed. *ma gets the number of winners in
// the pool rows of chain A (see split_rows).
template <bool kPix, typename T, typename I>
inline int64_t gather_winners(const I* ind, const T* grad, int64_t ph_n, int64_t pw_n, int64_t pool,
                              int64_t ws, int64_t gws, int32_t no_grad, const int64_t* win_off,
                              const int64_t* win_pix, int64_t* offs, int64_t* pix, T* gvals,
                              int64_t* ma) {
  int64_t m = 0;
  const int64_t split = split_rows(ph_n);
  for (int64_t ph = 0; ph < ph_n; ++ph) {
    if (ph == split) *ma = m;
    const I* ind_row = ind + ph * pw_n;
    const T* grad_row = grad + ph * pw_n;
    int64_t off = ph * pool * ws;
    int64_t px = ph * pool * gws;
    for (int64_t pw = 0; pw < pw_n; ++pw, off += pool, px += pool) {
      const int32_t j = static_cast<int32_t>(ind_row[pw]);
      // One unsigned compare rejects both the no-gradient marker and any
      // value outside the window (a corrupt or hand-made indices tensor,
      // negative ones included): they pass no gradient, and no table is
      // indexed with them (the entry written for them is overwritten or
      // lies past the list's end).
      const bool win = winner_in_window(j, no_grad);
      const int32_t jj = j & -static_cast<int32_t>(win);
      offs[m] = off + win_off[jj];
      if constexpr (kPix) pix[m] = px + win_pix[jj];
      gvals[m] = grad_row[pw];
      m += win ? 1 : 0;
    }
  }
  if (split >= ph_n) *ma = m;
  return m;
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

// How the index-driven path below reads a saved index j: code[j].off is the
// winner's offset from its window's corner in xp, and code[j].keep all ones;
// for the no-gradient marker and anything outside the window (a corrupt or
// hand-made indices tensor), keep is 0 and off the (absolute) offset of the
// zero rows below the plane. One table load replaces the compare, the masks
// and the selects of a per-window decode.
struct WinnerCode {
  int64_t off;
  int64_t keep;
};

// The entry of code[] for a saved index: every uint8 value has its own entry
// (the table has 256 or more), wider indices are clamped to the marker's.
template <typename I>
inline int64_t code_index(I j, int32_t no_grad) {
  if constexpr (sizeof(I) == 1) {
    return static_cast<uint8_t>(j);
  } else {
    const int32_t v = static_cast<int32_t>(j);
    return winner_in_window(v, no_grad) ? v : no_grad;
  }
}

// `v` where keep is all ones, +0 where it is 0, by masking the bits (no
// arithmetic on v, so a NaN or inf gradient of a window without a winner
// never leaks in).
template <typename T>
inline T masked(T v, int64_t keep) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  U bits;
  __builtin_memcpy(&bits, &v, sizeof(T));
  bits &= static_cast<U>(keep);
  T r;
  __builtin_memcpy(&r, &bits, sizeof(T));
  return r;
}

// The gradient of each window of a channel where it has a winner, +0 where
// not (by masking the bits: a NaN or inf gradient of a window without a
// winner never leaks in). A plain loop, so the compiler vectorizes it.
template <typename T, typename I>
inline void masked_grads(const I* __restrict ind, const T* __restrict grad, int64_t cells,
                         int32_t no_grad, T* __restrict gs) {
  for (int64_t k = 0; k < cells; ++k) {
    const bool win = winner_in_window(static_cast<int32_t>(ind[k]), no_grad);
    gs[k] = masked(grad[k], -static_cast<int64_t>(win));
  }
}

// grad_bias of one channel from masked_grads: L lanes (lane l takes windows
// l, l + L, ... in order), then the lanes added in order. Vector adds hide
// the add latency a single running sum waits on; every path sums the same
// masked array this way, so grad_bias is the same whatever else is asked.
template <typename T>
inline T lane_sum(const T* gs, int64_t cells) {
  using V = typename Simd<T>::V;
  constexpr int64_t L = vector_lanes<T>();
  V acc{};
  int64_t k = 0;
  for (; k + L <= cells; k += L) acc += loadu<V>(gs + k);
  T lanes[L];
  storeu(lanes, acc);
  for (int64_t l = 0; k < cells; ++k, ++l) lanes[l] += gs[k];
  T s = lanes[0];
  for (int64_t l = 1; l < L; ++l) s += lanes[l];
  return s;
}

// The index-driven path for pool 2 (the model's block 1), step 1: decode
// all the windows of a channel into o[k] = offset of window k's winner in xp
// (or of the zero rows below the plane, zoff, for a window without one) and
// gs[k] (masked_grads' values). corner[k] is window k's corner in xp. A plain
// loop without tables, so the compiler vectorizes it. Step 2 is
// weight_grad_rows_tile over all windows, chain A being the windows of the
// pool rows [0, split_rows(ph)) as in the winner list.
template <typename T, typename I, typename E>
inline void decode_windows_pool2(const I* __restrict ind, const T* __restrict grad, int64_t cells,
                                 const E* __restrict corner, E ws, E zoff, E* __restrict o,
                                 T* __restrict gs) {
  for (int64_t k = 0; k < cells; ++k) {
    const E j = static_cast<E>(ind[k]);
    const bool win = winner_in_window(static_cast<int32_t>(j), 4);
    const E keep = -static_cast<E>(win);
    o[k] = ((corner[k] + (j >> 1) * ws + (j & 1)) & keep) | (zoff & ~keep);
    gs[k] = masked(grad[k], -static_cast<int64_t>(win));
  }
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

// Explicit instantiations: {float, double} x {uint8 indices, int32 indices}.
#define FMNIST_INSTANTIATE(T, I)                                                  \
  template void forward_images<T, I>(const ForwardArgs<T, I>&, int64_t, int64_t); \
  template void backward_images<T, I>(const BackwardArgs<T, I>&, int64_t, int64_t);
FMNIST_INSTANTIATE(float, uint8_t)
FMNIST_INSTANTIATE(float, int32_t)
FMNIST_INSTANTIATE(double, uint8_t)
FMNIST_INSTANTIATE(double, int32_t)
#undef FMNIST_INSTANTIATE

}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
