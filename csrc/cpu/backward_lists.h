// Which pool windows of a channel pass a gradient to the backward, and with
// what gradient: the winner lists, the masked gradients (grad_bias) and the
// decodes of the index-driven paths. Part of one instruction-set build
// (kernels.h: compiled once per ISA, internal linkage, no ATen/c10 headers).
//
// Decomposition: per (image, output channel), one pass over the channel's
// ph x pw saved indices and gradients. gather_winners writes the windows
// that pass a gradient (index != no-gradient marker, and inside the window)
// into a short list of (offset in xp, [pixel in gxp,] gradient), without
// branches; every other convolution position is then skipped by the
// grad_weight / grad_input kernels (backward_kernels.h). masked_grads +
// lane_sum give grad_bias: the gradients of the windows with a winner, in
// vector lanes over all the channel's windows (the others masked to +0), the
// same way on every path. decode_windows_pool2 and the WinnerCode table
// decode every window instead (the first-layer paths, which skip the list).
// All sums over windows use the two chains of split_rows.
//
// Memory traffic: the indices and grad_out of a channel are read once per
// pass (a channel's ph x pw values: L1-resident); the list, the masked
// gradients and the decode tables are per-call scratch that stays in L1.
#pragma once

#include <cstdint>
#include <type_traits>

#include "simd.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

// The pool windows of a channel are summed in two chains that run side by
// side: chain A over the pool rows [0, split_rows(ph)), chain B over the rest,
// each in scan order, then A + B. The two chains hide the FMA (and add)
// latency that a single running sum waits on per window; the winner list and
// the index-driven paths (backward_kernels.h) use this same association, so
// their sums are equal bit for bit (a window without a winner adds exactly
// +0).
inline int64_t split_rows(int64_t ph_n) { return (ph_n + 1) / 2; }

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

// How the index-driven path (weight_grad_cells) reads a saved index j:
// code[j].off is the winner's offset from its window's corner in xp, and
// code[j].keep all ones; for the no-gradient marker and anything outside the
// window (a corrupt or hand-made indices tensor), keep is 0 and off the
// (absolute) offset of the zero rows below the plane. One table load
// replaces the compare, the masks and the selects of a per-window decode.
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

}  // namespace
}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
