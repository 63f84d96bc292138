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
//   grad_bias   += sum of those gradients.
//   grad_weight += g * input patch, accumulated over the list in registers
//                  (one vector covers a filter row), then added to the
//                  worker's private partial sum; the caller adds the
//                  partials of all workers (no atomics).
//                  A first layer (one input channel, no grad_input asked
//                  for, filter rows of one vector, kh <= 8: the model's
//                  block 1) skips the list: weight_grad_cells visits every
//                  window straight from the indices, a window without a
//                  winner reading zero rows below the image with g = +0.
//   grad_input  += g * filter, scattered into a padded channels-last buffer
//                  for the image (one vector per pixel's channels, so the
//                  read-modify-writes never partly overlap and stall), then
//                  copied out to NCHW without the padding.
//   Memory traffic: read input, grad_out and indices once, write grad_input
//   once; the weights and partial sums stay in L1/L2.
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
  typedef I HI __attribute__((vector_size(H * sizeof(I))));
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
    const HI jn = __builtin_convertvector(pass ? best_j : no_grad, HI);
    T* o = out + c * out_cstride;
    I* ix = idx + c * out_cstride;
    if (valid == H) {
      storeu(o, res);
      storeu(ix, jn);
    } else {
      for (int64_t x = 0; x < valid; ++x) {
        o[x] = res[x];
        ix[x] = jn[x];
      }
    }
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

// out[0, valid) = res's first lanes, idx[0, valid) = j's (narrowed to I):
// whole vectors where all L lanes are valid, else half a vector and the rest
// one by one (never past `valid`: the next row may already be written).
template <typename T, typename I, typename V, typename M>
inline void store_lanes(T* out, I* idx, V res, M j, int64_t valid) {
  constexpr int L = static_cast<int>(vector_lanes<T>());
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

// The same for all kh rows of a filter at once when a row fits one vector:
// the kh sums are independent, so one pass over the winners (one broadcast
// of g each) feeds kh FMAs.
constexpr int64_t kMaxKhTile = 8;
template <typename T, int KH>
inline void weight_grad_rows_tile_kh(const T* xplane, int64_t ws, const int64_t* offs,
                                     const T* gvals, int64_t m, T* gw, int64_t kwp) {
  using V = typename Simd<T>::V;
  V acc[KH];
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) acc[i] = V{};
  for (int64_t t = 0; t < m; ++t) {
    const V gv = splat<V>(gvals[t]);
    const T* x = xplane + offs[t];
#pragma GCC unroll 8
    for (int i = 0; i < KH; ++i) acc[i] += gv * loadu<V>(x + i * ws);
  }
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) storeu(gw + i * kwp, loadu<V>(gw + i * kwp) + acc[i]);
}

template <typename T>
inline void weight_grad_rows_tile(const T* xplane, int64_t ws, int64_t kh, const int64_t* offs,
                                  const T* gvals, int64_t m, T* gw, int64_t kwp) {
  switch (kh) {
    case 1: return weight_grad_rows_tile_kh<T, 1>(xplane, ws, offs, gvals, m, gw, kwp);
    case 2: return weight_grad_rows_tile_kh<T, 2>(xplane, ws, offs, gvals, m, gw, kwp);
    case 3: return weight_grad_rows_tile_kh<T, 3>(xplane, ws, offs, gvals, m, gw, kwp);
    case 4: return weight_grad_rows_tile_kh<T, 4>(xplane, ws, offs, gvals, m, gw, kwp);
    case 5: return weight_grad_rows_tile_kh<T, 5>(xplane, ws, offs, gvals, m, gw, kwp);
    case 6: return weight_grad_rows_tile_kh<T, 6>(xplane, ws, offs, gvals, m, gw, kwp);
    case 7: return weight_grad_rows_tile_kh<T, 7>(xplane, ws, offs, gvals, m, gw, kwp);
    case 8: return weight_grad_rows_tile_kh<T, 8>(xplane, ws, offs, gvals, m, gw, kwp);
    default: break;
  }
  for (int64_t i = 0; i < kh; ++i)
    weight_grad_row(xplane + i * ws, 1, offs, gvals, m, gw + i * kwp);
}

// The pool windows of one channel that pass a gradient, as a list of
// (offset of the winner in xp, [its pixel in gxp,] gradient); returns the
// list's length. Branch-free: every window's entry is written at the list's
// end and the end moves on only for a winner, so the unpredictable "passes a
// gradient?" test costs no mispredicted branch, and the offsets are carried
// along the rows instead of recomputed.
template <bool kPix, typename T, typename I>
inline int64_t gather_winners(const I* ind, const T* grad, int64_t ph_n, int64_t pw_n, int64_t pool,
                              int64_t ws, int64_t gws, int32_t no_grad, const int64_t* win_off,
                              const int64_t* win_pix, int64_t* offs, int64_t* pix, T* gvals) {
  int64_t m = 0;
  for (int64_t ph = 0; ph < ph_n; ++ph) {
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
  return m;
}

// `v` where `keep`, else +0, without a branch (and without arithmetic on v,
// so a NaN or inf gradient of a window without a winner never leaks in).
template <typename T>
inline T keep_or_zero(T v, bool keep) {
  using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
  U bits;
  __builtin_memcpy(&bits, &v, sizeof(T));
  bits &= static_cast<U>(0) - static_cast<U>(keep);
  T r;
  __builtin_memcpy(&r, &bits, sizeof(T));
  return r;
}

// grad_weight (and grad_bias) of one channel x one input channel straight
// from the saved indices, with no winner list, when no grad_input is asked
// for and a filter row fits one vector (the model's first block): every pool
// window of the channel is visited once; a window without a winner reads the
// zero rows at `zoff` below the plane with g = +0, so it adds exactly +0 and
// the sums equal the winner list's. This saves the list's separate pass
// (a store and a reload per window) and its loop-carried length.
template <typename T, typename I, int KH, bool kBias>
inline void weight_grad_cells_kh(const T* xplane, int64_t ws, int64_t zoff, const I* ind,
                                 const T* grad, int64_t ph_n, int64_t pw_n, int64_t pool,
                                 int32_t no_grad, const int64_t* win_off, T* gw, int64_t kwp,
                                 T* gb) {
  using V = typename Simd<T>::V;
  V acc[KH];
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) acc[i] = V{};
  T s = 0;
  for (int64_t ph = 0; ph < ph_n; ++ph) {
    const I* ind_row = ind + ph * pw_n;
    const T* grad_row = grad + ph * pw_n;
    int64_t off = ph * pool * ws;
    for (int64_t pw = 0; pw < pw_n; ++pw, off += pool) {
      const int32_t j = static_cast<int32_t>(ind_row[pw]);
      // As in gather_winners: one unsigned compare rejects the no-gradient
      // marker and anything outside the window; the table is indexed with 0
      // for them and their offset is the zero rows'.
      const bool win = winner_in_window(j, no_grad);
      const int64_t mask = -static_cast<int64_t>(win);
      const int32_t jj = j & static_cast<int32_t>(mask);
      const int64_t o = ((off + win_off[jj]) & mask) | (zoff & ~mask);
      const T gs = keep_or_zero(grad_row[pw], win);
      if constexpr (kBias) s += gs;
      const V gv = splat<V>(gs);
      const T* x = xplane + o;
#pragma GCC unroll 8
      for (int i = 0; i < KH; ++i) acc[i] += gv * loadu<V>(x + i * ws);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < KH; ++i) storeu(gw + i * kwp, loadu<V>(gw + i * kwp) + acc[i]);
  if constexpr (kBias) *gb += s;
}

template <typename T, typename I, bool kBias>
inline void weight_grad_cells_b(const T* xplane, int64_t ws, int64_t zoff, int64_t kh, const I* ind,
                                const T* grad, int64_t ph_n, int64_t pw_n, int64_t pool,
                                int32_t no_grad, const int64_t* win_off, T* gw, int64_t kwp,
                                T* gb) {
#define FMNIST_CELLS_CASE(KH)                                                                   \
  case KH:                                                                                      \
    return weight_grad_cells_kh<T, I, KH, kBias>(xplane, ws, zoff, ind, grad, ph_n, pw_n, pool, \
                                                 no_grad, win_off, gw, kwp, gb);
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

// grad_bias is added (once per channel) when gb is not null.
template <typename T, typename I>
inline void weight_grad_cells(const T* xplane, int64_t ws, int64_t zoff, int64_t kh, const I* ind,
                              const T* grad, int64_t ph_n, int64_t pw_n, int64_t pool,
                              int32_t no_grad, const int64_t* win_off, T* gw, int64_t kwp, T* gb) {
  if (gb) {
    weight_grad_cells_b<T, I, true>(xplane, ws, zoff, kh, ind, grad, ph_n, pw_n, pool, no_grad,
                                    win_off, gw, kwp, gb);
  } else {
    weight_grad_cells_b<T, I, false>(xplane, ws, zoff, kh, ind, grad, ph_n, pw_n, pool, no_grad,
                                     win_off, gw, kwp, gb);
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

template <typename T, typename I>
void backward_images(const BackwardArgs<T, I>& a, int64_t n0, int64_t n1) {
  using V = typename Simd<T>::V;
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

  // xp: zero-padded input [cin][hp][ws] (for grad_weight).
  // gxp: zero-padded grad_input, channels last [hp][gws][cinp], so that one
  //   winner adds g * filter[:, i, j] to one pixel's channel vector: whole,
  //   aligned read-modify-writes that never partly overlap each other.
  // wt: the filter as [cout][kh][kw][cinp], zero past cin.
  const int64_t xp_size = need_gw ? g.cin * plane : 0;
  const int64_t gxp_size = need_gi ? hp * gws * cinp : 0;
  const int64_t wt_size = need_gi ? g.cout * g.kh * g.kw * cinp : 0;
  Scratch<T> scratch(xp_size + gxp_size + wt_size + cells + L);
  Scratch<int64_t> offsets(2 * cells + 2 * pool * pool);
  T* gxp = scratch.p;  // first, so its pixel vectors are 32-byte aligned
  T* wt = gxp + gxp_size;
  T* xp = wt + wt_size;
  T* gvals = xp + xp_size;
  int64_t* offs = offsets.p;         // winner position in xp
  int64_t* pix = offsets.p + cells;  // winner pixel in gxp
  int64_t* win_off = pix + cells;
  int64_t* win_pix = win_off + pool * pool;

  // Offset of window position j from the window's corner, in xp and in gxp
  // (a table, so the hot loop does no integer division).
  for (int32_t j = 0; j < no_grad; ++j) {
    win_off[j] = winner_row(0, j, pool) * ws + winner_col(0, j, pool);
    win_pix[j] = winner_row(0, j, pool) * gws + winner_col(0, j, pool);
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
    if (need_gw) load_padded_image(g, a.input, a.input_strides, n, xp, hpx, ws);
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
      if (cells_path) {
        T* gw_co = a.grad_weight_part + co * g.cin * g.kh * kwp;
        for (int64_t ci = 0; ci < g.cin; ++ci) {
          weight_grad_cells(xp + ci * plane, ws, hp * ws, g.kh, a.indices + base, a.grad_out + base,
                            g.ph, g.pw, pool, no_grad, win_off, gw_co + ci * g.kh * kwp, kwp,
                            (need_gb && ci == 0) ? a.grad_bias_part + co : nullptr);
        }
        continue;
      }
      const int64_t m =
          need_gi ? gather_winners<true>(a.indices + base, a.grad_out + base, g.ph, g.pw, pool, ws,
                                         gws, no_grad, win_off, win_pix, offs, pix, gvals)
                  : gather_winners<false>(a.indices + base, a.grad_out + base, g.ph, g.pw, pool, ws,
                                          gws, no_grad, win_off, win_pix, offs, pix, gvals);
      if (m == 0) continue;
      if (need_gb) {
        T s = 0;
        for (int64_t t = 0; t < m; ++t) s += gvals[t];
        a.grad_bias_part[co] += s;
      }
      if (need_gw) {
        // grad_weight[co][ci][i][:] += sum over winners of g * input row
        // segment; one vector holds L filter columns (lanes past kw collect
        // garbage that the caller drops).
        T* gw_co = a.grad_weight_part + co * g.cin * g.kh * kwp;
        if (nq == 1 && g.kh <= kMaxKhTile) {
          for (int64_t ci = 0; ci < g.cin; ++ci) {
            weight_grad_rows_tile(xp + ci * plane, ws, g.kh, offs, gvals, m,
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
        // gxp[oh+i][ow+j][:] += g * filter[co][i][j][:] for every winner.
        const T* wco = wt + co * g.kh * g.kw * cinp;
        for (int64_t t = 0; t < m; ++t) {
          const V gv = splat<V>(gvals[t]);
          for (int64_t i = 0; i < g.kh; ++i) {
            T* row = gxp + (pix[t] + i * gws) * cinp;
            const T* wrow = wco + i * g.kw * cinp;
            for (int64_t e = 0; e < g.kw * cinp; e += L) {
              storeu(row + e, loadu<V>(row + e) + gv * loadu<V>(wrow + e));
            }
          }
        }
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
