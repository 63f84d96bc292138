// grad_input's block phases: the gather kernel (any shape) and the dense
// masked transposed convolution (block 2's shape); each section's comment
// gives its decomposition and memory traffic.
#pragma once

#include "kernels_common.cuh"

namespace fmnist_ext {
namespace cuda {

// ---------------------------------------------------------------------------
// Backward, grad_input (gather, no atomics): one block = `imgs` images.
// Shared memory (BwdInputSmem): weight[cout][kh][kw][cinp] (T) |
//   grad[imgs][cout][cells] (T) | winner[imgs][cout][cells] (int32: packed
//   winner row/col, -1: no gradient). The int32 array comes last, so every
//   array starts aligned for its type.
// Work item = (img, input-channel block of CB, y, x), x fastest: the thread
// visits, per output channel, the pool cells whose windows can contain a
// convolution position that reads (y, x) (first_cell_reaching ..
// last_cell_reaching in index_math.h) and adds g * w for each cell whose
// winner does; every grad_input element is written exactly once.
template <typename T, typename I>
struct BwdInputArgs {
  KernelGeometry g;
  const T* weight;    // contiguous
  const T* grad_out;  // contiguous [n][cout][ph][pw]
  const I* indices;   // contiguous [n][cout][ph][pw]
  T* grad_input;      // [n][cin][h][w]
  int imgs;           // images per block
  int cinp;           // cin rounded up to the channel block CB
};

// The block's shared memory, carved as laid out above; bwd_input_smem_bytes
// is its size (the launch plan's).
template <typename T, typename Byte>
struct BwdInputSmem {
  SmemPtr<Byte, T> weight;
  SmemPtr<Byte, T> grad;
  SmemPtr<Byte, int32_t> winner;
};

template <typename T, typename I, typename Byte>
FMNIST_HD BwdInputSmem<T, Byte> bwd_input_smem(const BwdInputArgs<T, I>& a, Byte* smem) {
  const KernelGeometry& g = a.g;
  BwdInputSmem<T, Byte> sm;
  sm.weight = reinterpret_cast<SmemPtr<Byte, T>>(smem);
  sm.grad = sm.weight + g.cout * g.kh * g.kw * a.cinp;
  sm.winner = reinterpret_cast<SmemPtr<Byte, int32_t>>(sm.grad + a.imgs * g.cout * g.ph * g.pw);
  return sm;
}

FMNIST_HD size_t bwd_input_smem_bytes(const KernelGeometry& g, int imgs, int cinp, size_t elem) {
  const size_t cells = static_cast<size_t>(g.ph) * g.pw;
  return elem * (static_cast<size_t>(g.cout) * g.kh * g.kw * cinp +
                 static_cast<size_t>(imgs) * g.cout * cells) +
         sizeof(int32_t) * static_cast<size_t>(imgs) * g.cout * cells;
}

// Packs the winner (conv row, conv col) of a cell; -1 = no gradient.
FMNIST_HD int32_t pack_winner(int32_t j, int oph, int opw, int pool) {
  if (!winner_in_window(j, no_grad_index(pool))) return -1;
  return static_cast<int32_t>((winner_row(oph, j, pool) << 16) | winner_col(opw, j, pool));
}

template <typename T, typename I>
FMNIST_HD void bwd_input_stage(const BwdInputArgs<T, I>& a, int64_t bx, unsigned char* smem,
                               int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const int khw = g.kh * g.kw;
  const int cells = g.ph * g.pw;
  const BwdInputSmem<T, unsigned char> sm = bwd_input_smem(a, smem);
  // Weights to [co][i][j][ci] (zero past cin): the CB weights of a tap are adjacent.
  for (int e = tid; e < g.cout * khw * a.cinp; e += nthreads) {
    const int ci = e % a.cinp;
    const int t = (e / a.cinp) % khw;
    const int co = e / (a.cinp * khw);
    sm.weight[e] = ci < g.cin ? a.weight[(static_cast<int64_t>(co) * g.cin + ci) * khw + t] : T(0);
  }
  const int64_t n0 = bx * a.imgs;
  for (int e = tid; e < a.imgs * g.cout * cells; e += nthreads) {
    const int cell = e % cells;
    const int64_t n = n0 + e / (g.cout * cells);
    int32_t packed = -1;
    T gv = T(0);
    if (n < g.n) {
      const int64_t src = n0 * g.cout * cells + e;
      packed = pack_winner(static_cast<int32_t>(a.indices[src]), cell / g.pw, cell % g.pw, g.pool);
      gv = a.grad_out[src];
    }
    sm.winner[e] = packed;
    sm.grad[e] = gv;
  }
}

template <typename T, typename acc_t, typename I, int CB>
FMNIST_HD void bwd_input_work(const BwdInputArgs<T, I>& a, int64_t bx, const unsigned char* smem,
                              int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const int khw = g.kh * g.kw;
  const int cells = g.ph * g.pw;
  const int cblocks = a.cinp / CB;
  const int hw = g.h * g.w;
  const BwdInputSmem<T, const unsigned char> sm = bwd_input_smem(a, smem);
  const int items = a.imgs * cblocks * hw;
  for (int item = tid; item < items; item += nthreads) {
    const int pix = item % hw;
    const int cb = (item / hw) % cblocks;
    const int img = item / (hw * cblocks);
    const int64_t n = bx * a.imgs + img;
    if (n >= g.n) continue;
    const int yp = pix / g.w + g.pad_h, xp = pix % g.w + g.pad_w;
    const int ph_lo = first_cell_reaching(yp, g.kh, g.pool);
    const int ph_hi = imin(g.ph - 1, last_cell_reaching(yp, g.pool));
    const int pw_lo = first_cell_reaching(xp, g.kw, g.pool);
    const int pw_hi = imin(g.pw - 1, last_cell_reaching(xp, g.pool));
    acc_t acc[CB];
#pragma unroll
    for (int c = 0; c < CB; ++c) acc[c] = acc_t(0);
    for (int co = 0; co < g.cout; ++co) {
      const int base = (img * g.cout + co) * cells;
      const T* wc = sm.weight + co * khw * a.cinp + cb * CB;
      for (int oph = ph_lo; oph <= ph_hi; ++oph) {
        for (int opw = pw_lo; opw <= pw_hi; ++opw) {
          const int32_t packed = sm.winner[base + oph * g.pw + opw];
          if (packed < 0) continue;
          const int di = yp - (packed >> 16), dj = xp - (packed & 0xffff);
          if (static_cast<unsigned>(di) >= static_cast<unsigned>(g.kh) ||
              static_cast<unsigned>(dj) >= static_cast<unsigned>(g.kw)) {
            continue;
          }
          const acc_t gv = static_cast<acc_t>(sm.grad[base + oph * g.pw + opw]);
          T wv[CB];
          load_vec(wc + (di * g.kw + dj) * a.cinp, wv);
#pragma unroll
          for (int c = 0; c < CB; ++c) acc[c] += gv * static_cast<acc_t>(wv[c]);
        }
      }
    }
#pragma unroll
    for (int c = 0; c < CB; ++c) {
      const int ci = cb * CB + c;
      if (ci < g.cin) a.grad_input[(n * g.cin + ci) * hw + pix] = static_cast<T>(acc[c]);
    }
  }
}

// grad_input, direct path (any size): one thread per input element.
template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_input_direct_item(const BwdInputArgs<T, I>& a, int64_t e) {
  const KernelGeometry& g = a.g;
  const int64_t hw = static_cast<int64_t>(g.h) * g.w;
  const int64_t pix = e % hw;
  const int ci = static_cast<int>((e / hw) % g.cin);
  const int64_t n = e / (hw * g.cin);
  const int yp = static_cast<int>(pix / g.w) + g.pad_h;
  const int xp = static_cast<int>(pix % g.w) + g.pad_w;
  const int ph_lo = first_cell_reaching(yp, g.kh, g.pool);
  const int ph_hi = imin(g.ph - 1, last_cell_reaching(yp, g.pool));
  const int pw_lo = first_cell_reaching(xp, g.kw, g.pool);
  const int pw_hi = imin(g.pw - 1, last_cell_reaching(xp, g.pool));
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  acc_t acc = acc_t(0);
  for (int co = 0; co < g.cout; ++co) {
    const int64_t base = (n * g.cout + co) * cells;
    const T* wc = a.weight + (static_cast<int64_t>(co) * g.cin + ci) * g.kh * g.kw;
    for (int oph = ph_lo; oph <= ph_hi; ++oph) {
      for (int opw = pw_lo; opw <= pw_hi; ++opw) {
        const int64_t k = base + static_cast<int64_t>(oph) * g.pw + opw;
        const int32_t j = static_cast<int32_t>(a.indices[k]);
        if (!winner_in_window(j, no_grad_index(g.pool))) continue;
        const int64_t di = yp - winner_row(oph, j, g.pool);
        const int64_t dj = xp - winner_col(opw, j, g.pool);
        if (di < 0 || di >= g.kh || dj < 0 || dj >= g.kw) continue;
        acc += static_cast<acc_t>(a.grad_out[k]) * static_cast<acc_t>(wc[di * g.kw + dj]);
      }
    }
  }
  a.grad_input[e] = static_cast<T>(acc);
}

// ---------------------------------------------------------------------------
// Backward, grad_input as a dense masked transposed convolution: the fast
// path for filters kDenseKW wide over a pooled region kDenseGW columns wide
// (pw * pool; block 2 of the model: 5 and 8). D, the gradient of the
// convolution output over the pooled region, is g at each pool winner and 0
// at every other position; grad_input is D transposed-convolved with the
// filters, every product of the sum formed whatever the data (no branch on
// winners; 0 * w adds nothing unless w is not finite, where the result is
// NaN as in stock's dense dgrad, while the CPU kernels skip the product).
// Persistent grid (plan.h): block bx stages the filter bank once, then loops
// over tiles of `imgs` images (tile = bx, bx + gridDim, ...): stage D of the
// tile (the winners placed, the rest zeroed), then thread (row band, image,
// input channel ci) accumulates a register tile of kDenseRows input rows x
// (kDenseGW + kDenseKW - 1) padded columns: for every output channel and D
// row rd that reaches its band it loads the D row once (16-byte loads) and,
// for each of its rows y with 0 <= y - rd < kh, the filter row
// w[co][ci][y - rd][0..kDenseKW) and adds their exact outer product
// (kDenseGW x kDenseKW FMAs with compile-time register indices: no column
// outside D's reach is computed). Input columns past D's reach are written
// as zeros; every grad_input element is written exactly once, nothing is
// zeroed first.
// Lanes: the threads of a band are lanes = 32 * ceil(imgs * cin / 32),
// lane = img * cin + ci (plan: imgs = 32 / cin images per tile), so a warp
// runs one band (the same loop bounds on every lane), lanes of an image read
// the same D row (a broadcast) and lanes of a channel the same filter row.
// Shared memory (BwdDenseSmem): d[imgs][dstride] (T; dstride = cout * gh *
//   kDenseGW rounded up to 32, + 4: consecutive images start 4 banks apart,
//   so the 16-byte D loads of a warp's images do not conflict)
//   | wa[cout][kh][kDenseKW / 4][cin][4] | wb[cout][kh][kDenseKW % 4][cin]
//   (T: the filter bank, its 4-wide column groups first, so the filter row
//   of a lane is one 16-byte load plus one word and the lanes of a warp read
//   adjacent words).
// Memory traffic: grad_output and indices read once; grad_input written
// once (each lane writes row segments of its own plane); the filter bank
// read once per block (L2-resident).
template <typename T, typename I>
struct BwdDenseArgs {
  KernelGeometry g;
  const T* weight;    // contiguous [cout][cin][kh][kDenseKW]
  const T* grad_out;  // contiguous [n][cout][ph][pw]
  const I* indices;   // contiguous [n][cout][ph][pw]
  T* grad_input;      // [n][cin][h][w]
  int imgs;           // images per tile
  int dstride;        // elements of d per image
  int64_t tiles;      // ceil(n / imgs)
};

// Row bands of kDenseRows input rows, and the lanes of one band.
FMNIST_HD int dense_bands(const KernelGeometry& g) { return ceil_div(g.h, kDenseRows); }
FMNIST_HD int dense_lanes(const KernelGeometry& g, int imgs) { return round_up(imgs * g.cin, 32); }

template <typename T, typename Byte>
struct BwdDenseSmem {
  SmemPtr<Byte, T> d;
  SmemPtr<Byte, T> wa;
  SmemPtr<Byte, T> wb;
};

template <typename T, typename I, typename Byte>
FMNIST_HD BwdDenseSmem<T, Byte> bwd_dense_smem(const BwdDenseArgs<T, I>& a, Byte* smem) {
  BwdDenseSmem<T, Byte> sm;
  sm.d = reinterpret_cast<SmemPtr<Byte, T>>(smem);
  sm.wa = sm.d + a.imgs * a.dstride;
  sm.wb = sm.wa + a.g.cout * a.g.kh * (kDenseKW / 4) * a.g.cin * 4;
  return sm;
}

FMNIST_HD size_t bwd_dense_smem_bytes(const KernelGeometry& g, int imgs, int dstride, size_t elem) {
  return elem * (static_cast<size_t>(imgs) * dstride +
                 static_cast<size_t>(g.cout) * g.kh * kDenseKW * g.cin);
}

// The filter bank, once per block: wa / wb as laid out above.
template <typename T, typename I>
FMNIST_HD void bwd_dense_stage_weights(const BwdDenseArgs<T, I>& a, unsigned char* smem, int tid,
                                       int nthreads) {
  constexpr int KQ = kDenseKW / 4 * 4, KR = kDenseKW - KQ;
  const KernelGeometry& g = a.g;
  const BwdDenseSmem<T, unsigned char> sm = bwd_dense_smem(a, smem);
  const int total = g.cout * g.cin * g.kh * kDenseKW;
  for (int e = tid; e < total; e += nthreads) {
    const int j = e % kDenseKW;
    const int i = (e / kDenseKW) % g.kh;
    const int ci = (e / (kDenseKW * g.kh)) % g.cin;
    const int co = e / (kDenseKW * g.kh * g.cin);
    const int row = co * g.kh + i;
    const T v = a.weight[e];
    if (j < KQ) {
      sm.wa[((row * (KQ / 4) + j / 4) * g.cin + ci) * 4 + j % 4] = v;
    } else {
      sm.wb[(row * KR + (j - KQ)) * g.cin + ci] = v;
    }
  }
}

// D of the tile's images (0 for images past the batch).
template <typename T, typename I>
FMNIST_HD void bwd_dense_stage_grad(const BwdDenseArgs<T, I>& a, int64_t tile, unsigned char* smem,
                                    int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const BwdDenseSmem<T, unsigned char> sm = bwd_dense_smem(a, smem);
  const int gh = g.ph * g.pool;
  const int per_img = g.cout * gh * kDenseGW;
  const int64_t n0 = tile * a.imgs;
  for (int e = tid; e < a.imgs * per_img; e += nthreads) {
    const int img = e / per_img, r = e % per_img;
    const int rx = r % kDenseGW;
    const int rd = (r / kDenseGW) % gh;
    const int co = r / (kDenseGW * gh);
    const int64_t n = n0 + img;
    T v = T(0);
    if (n < g.n) v = grad_at_position(g, a.grad_out, a.indices, n, co, rd, rx);
    sm.d[img * a.dstride + r] = v;
  }
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_dense_work(const BwdDenseArgs<T, I>& a, int64_t tile, const unsigned char* smem,
                              int tid, int nthreads) {
  constexpr int KW = kDenseKW, GW = kDenseGW, R = kDenseRows, NC = GW + KW - 1;
  constexpr int KQ = KW / 4 * 4, KR = KW - KQ;
  const KernelGeometry& g = a.g;
  const BwdDenseSmem<T, const unsigned char> sm = bwd_dense_smem(a, smem);
  const int gh = g.ph * g.pool;
  const int lanes = dense_lanes(g, a.imgs);
  const int units = dense_bands(g) * lanes;
  for (int u = tid; u < units; u += nthreads) {
    const int lane = u % lanes, band = u / lanes;
    if (lane >= a.imgs * g.cin) continue;
    const int img = lane / g.cin, ci = lane % g.cin;
    const int64_t n = tile * a.imgs + img;
    if (n >= g.n) continue;
    const int y0 = band * R;       // the band's first input row
    const int yp0 = y0 + g.pad_h;  // its padded row
    const int rd_lo = imax(0, yp0 - g.kh + 1);
    const int rd_hi = imin(gh - 1, yp0 + R - 1);
    acc_t acc[R][NC];
#pragma unroll
    for (int ty = 0; ty < R; ++ty) {
#pragma unroll
      for (int c = 0; c < NC; ++c) acc[ty][c] = acc_t(0);
    }
    const T* dimg = sm.d + img * a.dstride;
    for (int co = 0; co < g.cout; ++co) {
      for (int rd = rd_lo; rd <= rd_hi; ++rd) {
        T dv[GW];
        load_vec(dimg + (co * gh + rd) * GW, dv);
#pragma unroll
        for (int ty = 0; ty < R; ++ty) {
          const int i = yp0 + ty - rd;
          if (i < 0 || i >= g.kh) continue;
          const int row = co * g.kh + i;
          T wv[KW];
#pragma unroll
          for (int q = 0; q < KQ / 4; ++q) {
            T w4[4];
            load_vec(sm.wa + ((row * (KQ / 4) + q) * g.cin + ci) * 4, w4);
#pragma unroll
            for (int k = 0; k < 4; ++k) wv[4 * q + k] = w4[k];
          }
#pragma unroll
          for (int k = 0; k < KR; ++k) wv[KQ + k] = sm.wb[(row * KR + k) * g.cin + ci];
#pragma unroll
          for (int x = 0; x < GW; ++x) {
            const acc_t dx = static_cast<acc_t>(dv[x]);
#pragma unroll
            for (int j = 0; j < KW; ++j) acc[ty][x + j] += dx * static_cast<acc_t>(wv[j]);
          }
        }
      }
    }
    T* out = a.grad_input + (n * g.cin + ci) * g.h * g.w;
#pragma unroll
    for (int ty = 0; ty < R; ++ty) {
      const int y = y0 + ty;
      if (y >= g.h) break;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int x = c - g.pad_w;
        if (x >= 0 && x < g.w) out[y * g.w + x] = static_cast<T>(acc[ty][c]);
      }
      // Input columns past D's reach get no gradient.
      for (int x = imax(0, NC - g.pad_w); x < g.w; ++x) out[y * g.w + x] = T(0);
    }
  }
}

}  // namespace cuda
}  // namespace fmnist_ext
