// grad_weight's and grad_bias's block phases: the per-element kernel with
// its slice-order sums and the fixed-order reduction of the blocks' partial
// rows, and the dense register-accumulator kernel (the model's shapes).
#pragma once

#include "kernels_common.cuh"

namespace fmnist_ext {
namespace cuda {

// ---------------------------------------------------------------------------
// Backward, grad_weight and grad_bias, in two bitwise-reproducible steps.
// 1. Each block loops over chunks of `imgs` images (chunk = bx, bx + gridDim,
//    ...). Per chunk it stages the padded images and the packed winners
//    (offset of the winner's receptive field in the staged chunk, -1: no
//    gradient) with their gradients; then thread (slice s, element e) sums,
//    over the images img = s, s + S, ... of the chunk and the cells of e's
//    output channel, g * x[winner + offset(e)] (element e < cout*taps: a
//    weight, else a bias: g alone) into a private smem partial. At the end
//    the S slices are added up in slice order and the block writes its row
//    of partials[gridDim][E]. Elements are ordered by output channel, so the
//    lanes of a warp mostly test the same winner (a uniform branch).
// 2. reduce_partials: the rows added in a fixed tree (below), written to
//    grad_weight / grad_bias (every requested element is written).
// No atomics: the summation order depends only on the launch plan (batch,
// shape, SM count), never on scheduling, so a run repeats bitwise on the same
// GPU (what torch.use_deterministic_algorithms asks for).
// Shared memory (BwdWeightSmem): slice_sum[S][E] (acc_t) |
//   image[imgs][cin][staged_rows][staged_cols] (T) | grad[imgs][cout][cells] (T)
//   | winner[imgs][cout][cells] (int32: winner offset in image, -1: none).
//   acc_t comes first (its alignment is the largest), int32 last.
template <typename T, typename acc_t, typename I>
struct BwdWeightArgs {
  KernelGeometry g;
  const T* input;     // contiguous NCHW, or nullptr when grad_weight is not wanted
  const T* grad_out;  // contiguous
  const I* indices;   // contiguous
  T* grad_weight;     // [cout][cin][kh][kw], or nullptr: not wanted
  T* grad_bias;       // [cout], or nullptr: not wanted
  acc_t* partials;    // [rows][E]: rows = gridDim (fast path) or slices (direct)
  int imgs;           // images per chunk
  int slices;         // S
  int64_t chunks;     // ceil(n / imgs)
  // The dense kernel's strides (elements): staged image row and channel
  // plane, band of D.
  int xcols = 0, xplane = 0, dband = 0;
};

FMNIST_HD int bwd_weight_elems(const KernelGeometry& g) {
  return g.cout * g.cin * g.kh * g.kw + g.cout;
}

// The block's shared memory, carved as laid out above; bwd_weight_smem_bytes
// is its size (the launch plan's).
template <typename T, typename acc_t>
struct BwdWeightSmem {
  acc_t* slice_sum;
  T* image;
  T* grad;
  int32_t* winner;
};

template <typename T, typename acc_t, typename I>
FMNIST_HD BwdWeightSmem<T, acc_t> bwd_weight_smem(const BwdWeightArgs<T, acc_t, I>& a,
                                                  unsigned char* smem) {
  const KernelGeometry& g = a.g;
  BwdWeightSmem<T, acc_t> sm;
  sm.slice_sum = reinterpret_cast<acc_t*>(smem);
  sm.image = reinterpret_cast<T*>(sm.slice_sum + a.slices * bwd_weight_elems(g));
  sm.grad = sm.image + a.imgs * g.cin * staged_rows(g) * staged_cols(g);
  sm.winner = reinterpret_cast<int32_t*>(sm.grad + a.imgs * g.cout * g.ph * g.pw);
  return sm;
}

FMNIST_HD size_t bwd_weight_smem_bytes(const KernelGeometry& g, int imgs, int slices, size_t elem,
                                       size_t acc_elem) {
  const size_t cells = static_cast<size_t>(g.ph) * g.pw;
  return acc_elem * static_cast<size_t>(slices) * bwd_weight_elems(g) +
         elem * (static_cast<size_t>(imgs) * g.cin * staged_rows(g) * staged_cols(g) +
                 static_cast<size_t>(imgs) * g.cout * cells) +
         sizeof(int32_t) * static_cast<size_t>(imgs) * g.cout * cells;
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_weight_init(const BwdWeightArgs<T, acc_t, I>& a, unsigned char* smem, int tid,
                               int nthreads) {
  const BwdWeightSmem<T, acc_t> sm = bwd_weight_smem(a, smem);
  for (int e = tid; e < a.slices * bwd_weight_elems(a.g); e += nthreads) sm.slice_sum[e] = acc_t(0);
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_weight_stage(const BwdWeightArgs<T, acc_t, I>& a, int64_t chunk,
                                unsigned char* smem, int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const BwdWeightSmem<T, acc_t> sm = bwd_weight_smem(a, smem);
  const int64_t n0 = chunk * a.imgs;
  if (a.grad_weight != nullptr) {
    stage_images(g, a.input, n0, a.imgs, sm.image, packed_strides(g), tid, nthreads);
  }
  const int cells = g.ph * g.pw;
  const int cols = staged_cols(g);
  const int plane = staged_rows(g) * cols;
  for (int e = tid; e < a.imgs * g.cout * cells; e += nthreads) {
    const int cell = e % cells;
    const int img = e / (g.cout * cells);
    const int64_t n = n0 + img;
    int32_t off = -1;
    T gv = T(0);
    if (n < g.n) {
      const int64_t src = n0 * g.cout * cells + e;
      const int32_t j = static_cast<int32_t>(a.indices[src]);
      if (winner_in_window(j, no_grad_index(g.pool))) {
        off = img * g.cin * plane +
              static_cast<int32_t>(winner_row(cell / g.pw, j, g.pool)) * cols +
              static_cast<int32_t>(winner_col(cell % g.pw, j, g.pool));
      }
      gv = a.grad_out[src];
    }
    sm.winner[e] = off;
    sm.grad[e] = gv;
  }
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_weight_accumulate(const BwdWeightArgs<T, acc_t, I>& a, unsigned char* smem,
                                     int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const BwdWeightSmem<T, acc_t> sm = bwd_weight_smem(a, smem);
  const int khw = g.kh * g.kw;
  const int taps = g.cin * khw;
  const int nw = g.cout * taps;
  const int ne = bwd_weight_elems(g);
  const int cells = g.ph * g.pw;
  const int cols = staged_cols(g);
  const int plane = staged_rows(g) * cols;
  const bool want_w = a.grad_weight != nullptr, want_b = a.grad_bias != nullptr;
  for (int se = tid; se < a.slices * ne; se += nthreads) {
    const int e = se % ne, sl = se / ne;
    const bool is_w = e < nw;
    if (is_w ? !want_w : !want_b) continue;
    const int co = is_w ? e / taps : e - nw;
    int off = 0;
    if (is_w) {
      const int t = e % taps;
      off = (t / khw) * plane + ((t % khw) / g.kw) * cols + t % g.kw;
    }
    acc_t acc = acc_t(0);
    for (int img = sl; img < a.imgs; img += a.slices) {
      const int base = (img * g.cout + co) * cells;
      for (int cell = 0; cell < cells; ++cell) {
        const int32_t wofs = sm.winner[base + cell];
        if (wofs < 0) continue;
        const acc_t gv = static_cast<acc_t>(sm.grad[base + cell]);
        acc += is_w ? gv * static_cast<acc_t>(sm.image[wofs + off]) : gv;
      }
    }
    sm.slice_sum[se] += acc;
  }
}

// The block's row of partials: its slices added up in slice order.
template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_weight_flush(const BwdWeightArgs<T, acc_t, I>& a, int64_t bx,
                                unsigned char* smem, int tid, int nthreads) {
  const BwdWeightSmem<T, acc_t> sm = bwd_weight_smem(a, smem);
  const int ne = bwd_weight_elems(a.g);
  acc_t* row = a.partials + bx * ne;
  for (int e = tid; e < ne; e += nthreads) {
    acc_t sum = acc_t(0);
    for (int sl = 0; sl < a.slices; ++sl) sum += sm.slice_sum[sl * ne + e];
    row[e] = sum;
  }
}

// grad_weight / grad_bias, direct path (any size): thread (slice, element)
// sums over the images n = slice, slice + slices, ... reading global memory
// into partials[slice][element].
template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_weight_direct_item(const BwdWeightArgs<T, acc_t, I>& a, int64_t se) {
  const KernelGeometry& g = a.g;
  const int ne = bwd_weight_elems(g);
  const int khw = g.kh * g.kw;
  const int taps = g.cin * khw;
  const int nw = g.cout * taps;
  const int e = static_cast<int>(se % ne);
  const int64_t sl = se / ne;
  const bool is_w = e < nw;
  if ((is_w ? a.grad_weight : a.grad_bias) == nullptr) return;
  const int co = is_w ? e / taps : e - nw;
  const int t = is_w ? e % taps : 0;
  const int ci = t / khw, i = (t % khw) / g.kw, j = t % g.kw;
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  acc_t acc = acc_t(0);
  for (int64_t n = sl; n < g.n; n += a.slices) {
    const int64_t base = (n * g.cout + co) * cells;
    for (int64_t cell = 0; cell < cells; ++cell) {
      const int32_t jw = static_cast<int32_t>(a.indices[base + cell]);
      if (!winner_in_window(jw, no_grad_index(g.pool))) continue;
      const acc_t gv = static_cast<acc_t>(a.grad_out[base + cell]);
      if (!is_w) {
        acc += gv;
        continue;
      }
      const int64_t y = winner_row(cell / g.pw, jw, g.pool) + i - g.pad_h;
      const int64_t x = winner_col(cell % g.pw, jw, g.pool) + j - g.pad_w;
      if (y < 0 || y >= g.h || x < 0 || x >= g.w) continue;
      // Only formed for weight elements: input is nullptr when grad_weight
      // is not wanted, and offsetting a null pointer is undefined.
      acc += gv * static_cast<acc_t>(a.input[((n * g.cin + ci) * g.h + y) * g.w + x]);
    }
  }
  a.partials[se] = acc;
}

// ---------------------------------------------------------------------------
// grad_weight / grad_bias, dense: the fast path for kDenseKW-wide filters
// with C output channels over a pooled region GW columns wide, one
// instantiation per model block (kWDenseShapes: <6, 24> block 1, <12, 8>
// block 2). Step 1 of the scheme above as a dense product. With D the
// gradient of the convolution output over the pooled region (gh x GW; g at
// each winner, 0 elsewhere: grad_at_position) and x the staged padded image,
//   grad_weight[co][ci][i][j] = sum over positions (py, px) of the pooled
//   region of D[co][py][px] * x[ci][py + i][px + j],  grad_bias[co] = sum D.
// Decomposition: warp w of W takes the chunk's images w, w + W, ..., one at
// a time, and splits its gh rows into Q = 32 / (cin * kh) bands of
// bh = ceil(gh / Q) rows (block 1: 6 bands of 4 rows, block 2: 1 band of
// 8). Lane (band, ci, i) is slice s = w * Q + band; it keeps in registers the
// C x kDenseKW weights (co, ci, i, 0..kDenseKW) over ALL its chunks of a
// persistent grid. Per row py of its band it loads the staged row py + i of
// channel ci once (GW + kDenseKW - 1 words, 16-byte vector loads) and slides
// the filter window over it in registers; per position, one 16-byte
// broadcast load per 4 channels of D and C * kDenseKW FMAs. The bias: lane
// r = ci * kh + i sums the channels r, r + cin * kh (< C; at most
// kWDenseBiasRounds) over its band's D, one word per channel and position,
// all lanes the same number of rounds.
// After the last chunk the registers go to slice_sum[S][E] (aliasing the
// staging area) and bwd_weight_flush writes the block's row of partials in
// slice order; reduce_partials below. Every sum's order depends only on the
// plan: bitwise reproducible.
// Shared memory: x[imgs][cin][xplane] (rows xcols apart; the plan picks the
//   multiples of 4 that spread a request's row starts over the banks) |
//   D[imgs][Q][dband] (a band: bh rows of GW positions of wdense_cpad(C)
//   channels, the padding 0; dband = 4 mod 32 when Q > 1, so the Q bands'
//   broadcast loads hit distinct banks) (T), or, after the last chunk,
//   slice_sum[S][E] (acc_t).
struct WDenseShape {
  int c, gw;
};
constexpr WDenseShape kWDenseShapes[] = {{6, 24}, {12, 8}};
// Bias channels per lane at most (the plan: ceil(C / (cin * kh)) <= this).
constexpr int kWDenseBiasRounds = 2;

// D's channel stride: C rounded up to the 16-byte vector (4 elements).
FMNIST_HD constexpr int wdense_cpad(int c) { return (c + 3) / 4 * 4; }

// Bands per image (lanes (band, ci, i) of a warp) and rows per band.
FMNIST_HD int wdense_bands(const KernelGeometry& g) { return 32 / (g.cin * g.kh); }
FMNIST_HD int wdense_band_rows(const KernelGeometry& g) {
  return ceil_div(g.ph * g.pool, wdense_bands(g));
}

template <typename T, typename acc_t, typename I, typename Byte>
FMNIST_HD SmemPtr<Byte, T> wdense_d(const BwdWeightArgs<T, acc_t, I>& a, Byte* smem) {
  const int64_t x = round_up(static_cast<int64_t>(a.imgs) * a.g.cin * a.xplane, 4);
  return reinterpret_cast<SmemPtr<Byte, T>>(smem) + x;
}

FMNIST_HD size_t wdense_smem_bytes(const KernelGeometry& g, int imgs, int xplane, int dband,
                                   int slices, size_t elem, size_t acc_elem) {
  const size_t staged = elem * (round_up(static_cast<size_t>(imgs) * g.cin * xplane, size_t(4)) +
                                static_cast<size_t>(imgs) * wdense_bands(g) * dband);
  const size_t sums = acc_elem * static_cast<size_t>(slices) * bwd_weight_elems(g);
  return staged > sums ? staged : sums;
}

template <typename T, typename acc_t, typename I, int C, int GW>
FMNIST_HD void wdense_stage(const BwdWeightArgs<T, acc_t, I>& a, int64_t chunk, unsigned char* smem,
                            int tid, int nthreads) {
  constexpr int CP = wdense_cpad(C);
  const KernelGeometry& g = a.g;
  const int64_t n0 = chunk * a.imgs;
  T* x = reinterpret_cast<T*>(smem);
  if (a.grad_weight != nullptr) {
    // stage_images' loop, written out: through the shared helper ptxas
    // gives the <6, 24> kernel 80 registers and a 20-byte spill (98, none here).
    const int rows = staged_rows(g), cols = staged_cols(g);
    const int total = a.imgs * g.cin * rows * cols;
    for (int e = tid; e < total; e += nthreads) {
      const int c = e % cols;
      const int r = (e / cols) % rows;
      const int ic = e / (rows * cols);  // img * cin + ci
      const int64_t n = n0 + ic / g.cin;
      const int y = r - g.pad_h, xc = c - g.pad_w;
      T v = T(0);
      if (n < g.n && y >= 0 && y < g.h && xc >= 0 && xc < g.w) {
        v = a.input[((n0 * g.cin + ic) * g.h + y) * g.w + xc];
      }
      x[ic * a.xplane + r * a.xcols + c] = v;
    }
  }
  // D, every word of it (padding included: the vector loads read it).
  T* d = wdense_d(a, smem);
  const int q = wdense_bands(g), bh = wdense_band_rows(g), gh = g.ph * g.pool;
  const int total = a.imgs * q * a.dband;
  for (int e = tid; e < total; e += nthreads) {
    const int o = e % a.dband;  // offset in the band
    const int band = (e / a.dband) % q;
    const int64_t n = n0 + e / (a.dband * q);
    const int co = o % CP, px = (o / CP) % GW, t = o / (CP * GW);
    const int py = band * bh + t;
    T v = T(0);
    if (n < g.n && co < C && t < bh && py < gh) {
      v = grad_at_position(g, a.grad_out, a.indices, n, co, py, px);
    }
    d[e] = v;
  }
}

// A thread's registers (dense grad_weight): its weights and the bias of
// channels r + k * cin * kh (lane r = ci * kh + i).
template <typename acc_t, int C>
struct WDenseAcc {
  acc_t w[C][kDenseKW];
  acc_t b[kWDenseBiasRounds];
};

template <typename acc_t, int C>
FMNIST_HD void wdense_zero(WDenseAcc<acc_t, C>& acc) {
#pragma unroll
  for (int k = 0; k < kWDenseBiasRounds; ++k) acc.b[k] = acc_t(0);
#pragma unroll
  for (int co = 0; co < C; ++co) {
#pragma unroll
    for (int j = 0; j < kDenseKW; ++j) acc.w[co][j] = acc_t(0);
  }
}

// The thread's lane: slice s (-1: idle lane), warp, band, ci, i.
struct WDenseLane {
  int s, warp, band, ci, i;
};

FMNIST_HD WDenseLane wdense_lane(const KernelGeometry& g, int tid) {
  const int per = g.cin * g.kh;
  const int q = wdense_bands(g);
  const int warp = tid / 32, band = tid % 32 / per, r = tid % 32 % per;
  if (band >= q) return {-1, 0, 0, 0, 0};
  return {warp * q + band, warp, band, r / g.kh, r % g.kh};
}

template <typename T, typename acc_t, typename I, int C, int GW>
FMNIST_HD void wdense_accumulate(const BwdWeightArgs<T, acc_t, I>& a, const unsigned char* smem,
                                 WDenseLane L, WDenseAcc<acc_t, C>& acc) {
  constexpr int KW = kDenseKW, CP = wdense_cpad(C), NX = GW + KW - 1;
  const KernelGeometry& g = a.g;
  if (L.s < 0) return;
  const T* x = reinterpret_cast<const T*>(smem);
  const T* d = wdense_d(a, smem);
  const int q = wdense_bands(g), bh = wdense_band_rows(g);
  const int warps = a.slices / q;
  const int rows = imin(bh, g.ph * g.pool - L.band * bh);  // the band's rows (< 1: none)
  const int per = g.cin * g.kh, r = L.ci * g.kh + L.i;
  const int rounds = ceil_div(C, per);  // bias channels per lane
  const bool want_w = a.grad_weight != nullptr;
  for (int img = L.warp; img < a.imgs; img += warps) {
    const T* dband = d + (img * q + L.band) * a.dband;
    const T* xrow = x + (img * g.cin + L.ci) * a.xplane + (L.band * bh + L.i) * a.xcols;
    for (int t = 0; t < rows; ++t) {
      const T* drow = dband + t * GW * CP;
      if (want_w) {
        T xv[NX];
        load_vec(xrow + t * a.xcols, xv);
#pragma unroll
        for (int px = 0; px < GW; ++px) {
          T dv[CP];
          load_vec(drow + px * CP, dv);
#pragma unroll
          for (int co = 0; co < C; ++co) {
            const acc_t dc = static_cast<acc_t>(dv[co]);
#pragma unroll
            for (int j = 0; j < KW; ++j) acc.w[co][j] += dc * static_cast<acc_t>(xv[px + j]);
          }
        }
      }
      // Every lane runs the same rounds (uniform loads); a lane past the
      // channels repeats the last one and wdense_store discards the sum.
#pragma unroll
      for (int k = 0; k < kWDenseBiasRounds; ++k) {
        if (k < rounds) {
          const T* dc = drow + imin(r + k * per, C - 1);
          for (int px = 0; px < GW; ++px) acc.b[k] += static_cast<acc_t>(dc[px * CP]);
        }
      }
    }
  }
}

// After the last chunk (the staging area is free): the registers to
// slice_sum[s][e]; every element of every slice is written.
template <typename T, typename acc_t, typename I, int C>
FMNIST_HD void wdense_store(const BwdWeightArgs<T, acc_t, I>& a, unsigned char* smem, WDenseLane L,
                            const WDenseAcc<acc_t, C>& acc) {
  const KernelGeometry& g = a.g;
  if (L.s < 0) return;
  acc_t* row = reinterpret_cast<acc_t*>(smem) + L.s * bwd_weight_elems(g);
  const int nw = g.cout * g.cin * g.kh * kDenseKW;
#pragma unroll
  for (int co = 0; co < C; ++co) {
#pragma unroll
    for (int j = 0; j < kDenseKW; ++j) {
      row[((co * g.cin + L.ci) * g.kh + L.i) * kDenseKW + j] = acc.w[co][j];
    }
  }
  const int per = g.cin * g.kh, r = L.ci * g.kh + L.i;
#pragma unroll
  for (int k = 0; k < kWDenseBiasRounds; ++k) {
    const int c = r + k * per;
    if (c < C) row[nw + c] = acc.b[k];
  }
}

// ---------------------------------------------------------------------------
// Step 2, reduce_partials: grad_weight / grad_bias = the `rows` rows of
// partials[rows][E] added in a fixed tree. A group of kReduceElems elements
// (from group * kReduceElems; the last group fewer) is one block's at a time
// (a grid of at most kReduceBlocksPerSm per SM loops over the groups);
// thread (part p, element) adds the rows of its fixed range [rows * p / P, rows * (p + 1) / P)
// in row order (P = kReduceParts) into shared memory; then one thread per
// element adds its P part sums in a fixed pairwise tree and writes it: every
// requested element once. Two barriers per group. The order depends only
// on rows and P: bitwise reproducible. Traffic: every partial read once, a
// warp's request reads kReduceElems adjacent words of 32 / kReduceElems rows;
// a thread's chain of dependent loads is ceil(rows / P) long (the serial
// loop before: rows).
// Shared memory: part[P][kReduceElems] (acc_t).
constexpr int kReduceElems = 8;
constexpr int kReduceParts = kMaxThreads / kReduceElems;
constexpr int kReduceBlocksPerSm = 8;

FMNIST_HD size_t reduce_partials_smem_bytes(size_t acc_elem) {
  return acc_elem * kReduceParts * kReduceElems;
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void reduce_partials_range(const BwdWeightArgs<T, acc_t, I>& a, int64_t rows,
                                     int64_t group, unsigned char* smem, int tid) {
  acc_t* part = reinterpret_cast<acc_t*>(smem);
  const int ne = bwd_weight_elems(a.g);
  const int64_t e = group * kReduceElems + tid % kReduceElems;
  const int64_t p = tid / kReduceElems;
  acc_t sum = acc_t(0);
  if (e < ne) {
    for (int64_t r = rows * p / kReduceParts; r < rows * (p + 1) / kReduceParts; ++r) {
      sum += a.partials[r * ne + e];
    }
  }
  part[tid] = sum;
}

// Thread `element` of the group adds the P part sums of its element in a
// pairwise tree (the stride h = 1, 2, ..., P / 2 pass adds part p + h into
// part p for p a multiple of 2h; P is a power of two) in registers, and
// writes it.
template <typename T, typename acc_t, typename I>
FMNIST_HD void reduce_partials_tree(const BwdWeightArgs<T, acc_t, I>& a, int64_t group,
                                    const unsigned char* smem, int tid) {
  static_assert((kReduceParts & (kReduceParts - 1)) == 0, "the tree needs a power of two");
  const acc_t* part = reinterpret_cast<const acc_t*>(smem);
  const int ne = bwd_weight_elems(a.g);
  const int nw = ne - a.g.cout;
  const int64_t e = group * kReduceElems + tid;
  if (tid >= kReduceElems || e >= ne) return;
  T* dst = e < nw ? a.grad_weight : a.grad_bias;
  if (dst == nullptr) return;
  acc_t s[kReduceParts];
#pragma unroll
  for (int p = 0; p < kReduceParts; ++p) s[p] = part[p * kReduceElems + tid];
#pragma unroll
  for (int h = 1; h < kReduceParts; h *= 2) {
#pragma unroll
    for (int p = 0; p < kReduceParts; p += 2 * h) s[p] += s[p + h];
  }
  dst[e < nw ? e : e - nw] = static_cast<T>(s[0]);
}

}  // namespace cuda
}  // namespace fmnist_ext
