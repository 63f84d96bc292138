// grad_input's block phases: the gather kernel (any shape) and the winner
// patches (block 2's shape); each section's comment gives its decomposition
// and memory traffic.
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
  // The winner-patch kernel's per-image strides: g (elements), var (bytes).
  int gstride = 0, vstride = 0;
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
// Backward, grad_input from winner patches: the fast path for pool 2, 5 x 5
// filters and 4 pooled columns (block 2 of the model). A cell's gradient g
// reaches the kPatch x kPatch input patch under its pool window: g times the
// filter shifted by the winner's place (dy, dx) in the window. The block
// stages, for its input channel ci, the 4 shifted copies of every output
// channel's filter (zero outside the 5 x 5), so a winner picks its copy by
// address, and thread (row band b, image) adds g * copy into a register
// tile of kBandRows x 12 input values at compile-time register positions:
// 36 FMAs per cell and channel pair, where the dense transposed convolution
// makes 4 x 25. A copy is its 6 x 6 patch packed row after row, so the rows a
// band needs (6, 4 or 2, from row 0, 2 or 4) are 9, 6 or 3 16-byte loads,
// each feeding 4 FMAs. The 32 lanes of a warp are 32 images of one band:
// each of those loads reads at most 4 addresses, the same offset in the 4
// copies, which start at banks 0, 12, 24 and 4 (kPatchVar; for double at
// 0, 24, 16 and 8), one wavefront; their g and winner loads hit 32 banks
// (the plan's per-image strides).
// Every product is formed (no branch on the data: a cell without a winner
// has g = 0, and 0 * w adds nothing unless w is not finite, where the result
// is NaN as in stock's dense dgrad, while the CPU kernels skip the product).
// A block whose staged g holds an inf or NaN would also spread it over the
// zeros of the copies (inf * 0 = NaN where stock has no product): its
// threads see the stage's per-thread flags and compute their elements with
// the direct kernel's per-element sum instead (exact, slow, rare).
// Grid: (ceil(n / 32) image tiles, cin); threads: 32 per band (bands of
// kBandRows padded input rows cover the input; a band past the patches'
// reach writes zeros), looping if there are more than 8 bands.
// Shared memory (BwdPatchSmem): filt[cout][4][kPatchVar] (T: the 6 x 6
//   copy, then 8 unused) | g[32][gstride] (T; 0: no winner) |
//   var[32][vstride] (uint8: the winner's place, dy * 2 + dx) |
//   flag[kMaxThreads] (float: 1 where the thread staged a g that is not
//   finite, read as 16-byte vectors).
// Memory traffic: grad_output and indices read once per input channel
// (L2-resident after the first), grad_input written once (a lane writes its
// image's band rows), the filter bank once per block.
constexpr int kPatchImgs = 32;
constexpr int kPatch = 2 - 1 + kDenseKW;  // pool - 1 + kernel: 6
constexpr int kPatchVar = 44;             // elements between the shifted copies
constexpr int kBandRows = 6;
constexpr int kPatchPw = 4;                              // pooled columns
constexpr int kPatchCols = 2 * kPatchPw + kDenseKW - 1;  // their staged columns: 12

FMNIST_HD int patch_bands(const KernelGeometry& g) { return ceil_div(g.h + g.pad_h, kBandRows); }

template <typename T, typename Byte>
struct BwdPatchSmem {
  SmemPtr<Byte, T> filt;
  SmemPtr<Byte, T> g;
  SmemPtr<Byte, uint8_t> var;
  SmemPtr<Byte, float> flag;
};

template <typename T, typename I, typename Byte>
FMNIST_HD BwdPatchSmem<T, Byte> bwd_patch_smem(const BwdInputArgs<T, I>& a, Byte* smem) {
  BwdPatchSmem<T, Byte> sm;
  sm.filt = reinterpret_cast<SmemPtr<Byte, T>>(smem);
  sm.g = sm.filt + a.g.cout * 4 * kPatchVar;
  sm.var = reinterpret_cast<SmemPtr<Byte, uint8_t>>(sm.g + kPatchImgs * a.gstride);
  sm.flag = reinterpret_cast<SmemPtr<Byte, float>>(sm.var + kPatchImgs * a.vstride);
  return sm;
}

FMNIST_HD size_t bwd_patch_smem_bytes(const KernelGeometry& g, int gstride, int vstride,
                                      size_t elem) {
  return elem * (static_cast<size_t>(g.cout) * 4 * kPatchVar +
                 static_cast<size_t>(kPatchImgs) * gstride) +
         static_cast<size_t>(kPatchImgs) * vstride + sizeof(float) * kMaxThreads;
}

template <typename T, typename I>
FMNIST_HD void bwd_patch_stage(const BwdInputArgs<T, I>& a, int64_t bx, int ci, unsigned char* smem,
                               int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const BwdPatchSmem<T, unsigned char> sm = bwd_patch_smem(a, smem);
  // The shifted copies: filt[co][v][p][c] = w[co][ci][p - dy][c - dx].
  for (int e = tid; e < g.cout * 4 * kPatch * kPatch; e += nthreads) {
    const int c = e % kPatch, p = (e / kPatch) % kPatch, v = (e / (kPatch * kPatch)) % 4;
    const int co = e / (4 * kPatch * kPatch);
    const int i = p - v / 2, j = c - v % 2;
    T val = T(0);
    if (i >= 0 && i < kDenseKW && j >= 0 && j < kDenseKW) {
      val = a.weight[((static_cast<int64_t>(co) * g.cin + ci) * kDenseKW + i) * kDenseKW + j];
    }
    sm.filt[(co * 4 + v) * kPatchVar + p * kPatch + c] = val;
  }
  const int per_img = g.cout * g.ph * g.pw;
  const int64_t n0 = bx * kPatchImgs;
  bool finite = true;
  for (int e = tid; e < kPatchImgs * per_img; e += nthreads) {
    const int img = e / per_img, r = e % per_img;
    T gv = T(0);
    int32_t j = 0;
    if (n0 + img < g.n) {
      const int64_t src = n0 * per_img + e;
      const int32_t w = static_cast<int32_t>(a.indices[src]);
      if (winner_in_window(w, no_grad_index(2))) {
        gv = a.grad_out[src];
        j = w;
      }
    }
    finite = finite && gv - gv == T(0);
    sm.g[img * a.gstride + r] = gv;
    sm.var[img * a.vstride + r] = static_cast<uint8_t>(j);
  }
  sm.flag[tid] = finite ? 0.0f : 1.0f;
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void bwd_patch_work(const BwdInputArgs<T, I>& a, int64_t bx, int ci,
                              const unsigned char* smem, int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const BwdPatchSmem<T, const unsigned char> sm = bwd_patch_smem(a, smem);
  const int cells = g.ph * g.pw;
  bool slow = false;
  for (int t = 0; t < nthreads; t += 4) {  // nthreads: a multiple of 32 (the plan's)
    float f[4];
    load_vec(sm.flag + t, f);
    slow = slow || f[0] + f[1] + f[2] + f[3] != 0.0f;
  }
  if (slow) {
    const int64_t n0 = bx * kPatchImgs;
    const int64_t plane = static_cast<int64_t>(g.h) * g.w;
    for (int e = tid; e < kPatchImgs * plane; e += nthreads) {
      const int64_t n = n0 + e / plane;
      if (n < g.n) bwd_input_direct_item<T, acc_t, I>(a, (n * g.cin + ci) * plane + e % plane);
    }
    return;
  }
  for (int u = tid; u < patch_bands(g) * kPatchImgs; u += nthreads) {
    const int img = u % kPatchImgs, band = u / kPatchImgs;
    const int64_t n = bx * kPatchImgs + img;
    if (n >= g.n) continue;
    acc_t acc[kBandRows][kPatchCols];
#pragma unroll
    for (int q = 0; q < kBandRows; ++q) {
#pragma unroll
      for (int c = 0; c < kPatchCols; ++c) acc[q][c] = acc_t(0);
    }
    const T* gimg = sm.g + img * a.gstride;
    const uint8_t* vimg = sm.var + img * a.vstride;
    for (int co = 0; co < g.cout; ++co) {
      const T* fco = sm.filt + co * 4 * kPatchVar;
      // Pool rows oph = 3 * band + k whose patch rows 2 * oph .. 2 * oph + 5
      // meet the band's padded rows 6 * band .. 6 * band + 5.
#pragma unroll
      for (int k = -2; k <= 2; ++k) {
        const int oph = 3 * band + k;
        if (oph < 0 || oph >= g.ph) continue;
#pragma unroll
        for (int pc = 0; pc < kPatchPw; ++pc) {
          const int cell = co * cells + oph * g.pw + pc;
          const acc_t gv = static_cast<acc_t>(gimg[cell]);
          const T* f = fco + vimg[cell] * kPatchVar;
          // The copy's rows p that meet the band (from row 0, 2 or 4; element
          // e = 6 * p + c of the packed copy) add to the band's row 2 * k + p.
          constexpr int kVec = 4;
          static_assert(kPatch * 2 % kVec == 0, "row pairs of a copy are whole vectors");
#pragma unroll
          for (int e = kPatch * imax(0, -2 * k); e < kPatch * imin(kPatch, kBandRows - 2 * k);
               e += kVec) {
            T fr[kVec];
            load_vec(f + e, fr);
#pragma unroll
            for (int u = 0; u < kVec; ++u) {
              const int p = (e + u) / kPatch, c = (e + u) % kPatch;
              acc[2 * k + p][2 * pc + c] += gv * static_cast<acc_t>(fr[u]);
            }
          }
        }
      }
    }
    T* out = a.grad_input + (n * g.cin + ci) * g.h * g.w;
#pragma unroll
    for (int q = 0; q < kBandRows; ++q) {
      const int y = band * kBandRows + q - g.pad_h;
      if (y < 0) continue;
      if (y >= g.h) break;
#pragma unroll
      for (int c = 0; c < kPatchCols; ++c) {
        const int x = c - g.pad_w;
        if (x >= 0 && x < g.w) out[y * g.w + x] = static_cast<T>(acc[q][c]);
      }
      // Input columns past the patches' reach get no gradient.
      for (int x = imax(0, kPatchCols - g.pad_w); x < g.w; ++x) out[y * g.w + x] = T(0);
    }
  }
}

}  // namespace cuda
}  // namespace fmnist_ext
