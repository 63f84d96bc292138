// The forward's block phases (fast path through shared memory, direct path);
// each section's comment gives its decomposition and memory traffic.
#pragma once

#include "kernels_common.cuh"

namespace fmnist_ext {
namespace cuda {

// ---------------------------------------------------------------------------
// Forward, fast path: one block = `imgs` images x `cgp` output channels.
// Shared memory (FwdSmem): weight[taps][cgp] | bias[cgp] |
//   image[imgs][cin][staged_rows][staged_cols], all T.
// Work item = (img, channel quad, ph, pw), pw fastest (coalesced stores).
// P > 0: pool window known at compile time (all P*P window positions are
// accumulated together, reusing each weight load P*P times); P == 0: runtime.
template <typename T, typename I>
struct FwdArgs {
  KernelGeometry g;
  const T* input;   // contiguous NCHW
  const T* weight;  // contiguous [cout][cin][kh][kw]
  const T* bias;    // [cout] or nullptr
  T* out;           // [n][cout][ph][pw]
  I* indices;       // [n][cout][ph][pw]
  int imgs;         // images per block
  int cgp;          // channels per block (multiple of kCob)
  // The tiled path's staged strides (elements): row, image.
  int xcols = 0, ximg = 0;
};

// The block's shared memory, carved as laid out above; fwd_smem_bytes is its
// size (the launch plan's).
template <typename T>
struct FwdSmem {
  T* weight;
  T* bias;
  T* image;
};

// (E is T, or const T for the phases that only read.)
template <typename E, typename T, typename I>
FMNIST_HD FwdSmem<E> fwd_smem(const FwdArgs<T, I>& a, E* smem) {
  const int taps = a.g.cin * a.g.kh * a.g.kw;
  FwdSmem<E> sm;
  sm.weight = smem;
  sm.bias = sm.weight + taps * a.cgp;
  sm.image = sm.bias + a.cgp;
  return sm;
}

FMNIST_HD size_t fwd_smem_bytes(const KernelGeometry& g, int imgs, int cgp, size_t elem) {
  const size_t taps = static_cast<size_t>(g.cin) * g.kh * g.kw;
  return elem *
         (taps * cgp + cgp + static_cast<size_t>(imgs) * g.cin * staged_rows(g) * staged_cols(g));
}

template <typename T, typename I>
FMNIST_HD void fwd_stage(const FwdArgs<T, I>& a, int64_t bx, int by, T* smem, int tid,
                         int nthreads) {
  const KernelGeometry& g = a.g;
  const int taps = g.cin * g.kh * g.kw;
  const int cg0 = by * a.cgp;
  const FwdSmem<T> sm = fwd_smem(a, smem);
  // Weights transposed to [tap][channel] (zero past cout): the kCob weights a
  // thread needs for one tap are adjacent (one vector load, a broadcast).
  for (int e = tid; e < a.cgp * taps; e += nthreads) {
    const int c = e / taps, t = e % taps;
    const int co = cg0 + c;
    sm.weight[t * a.cgp + c] = co < g.cout ? a.weight[static_cast<int64_t>(co) * taps + t] : T(0);
  }
  for (int c = tid; c < a.cgp; c += nthreads) {
    const int co = cg0 + c;
    sm.bias[c] = (a.bias != nullptr && co < g.cout) ? a.bias[co] : T(0);
  }
  stage_images(g, a.input, bx * a.imgs, a.imgs, sm.image, packed_strides(g), tid, nthreads);
}

template <typename T, typename acc_t, typename I, int P>
FMNIST_HD void fwd_work(const FwdArgs<T, I>& a, int64_t bx, int by, const T* smem, int tid,
                        int nthreads) {
  const KernelGeometry& g = a.g;
  const int pool = P > 0 ? P : g.pool;
  const int quads = a.cgp / kCob;
  const int cells = g.ph * g.pw;
  const int items = a.imgs * quads * cells;
  const int cols = staged_cols(g);
  const int plane = staged_rows(g) * cols;
  const FwdSmem<const T> sm = fwd_smem(a, smem);
  for (int item = tid; item < items; item += nthreads) {
    const int cell = item % cells;
    const int q = (item / cells) % quads;
    const int img = item / (cells * quads);
    const int64_t n = bx * a.imgs + img;
    if (n >= g.n) continue;
    const int oph = cell / g.pw, opw = cell % g.pw;
    const int c0 = q * kCob;
    const T* xb = sm.image + img * g.cin * plane + (oph * pool) * cols + opw * pool;
    acc_t best[kCob];
    int32_t best_j[kCob];
#pragma unroll
    for (int c = 0; c < kCob; ++c) {
      best[c] = -static_cast<acc_t>(INFINITY);
      best_j[c] = 0;
    }
    if constexpr (P > 0) {
      acc_t acc[kCob][P * P];
#pragma unroll
      for (int c = 0; c < kCob; ++c) {
#pragma unroll
        for (int k = 0; k < P * P; ++k) acc[c][k] = static_cast<acc_t>(sm.bias[c0 + c]);
      }
      int t = 0;
      for (int ci = 0; ci < g.cin; ++ci) {
        for (int i = 0; i < g.kh; ++i) {
          const T* xr = xb + ci * plane + i * cols;
          for (int j = 0; j < g.kw; ++j, ++t) {
            T wv[kCob];
            load_vec(sm.weight + t * a.cgp + c0, wv);
#pragma unroll
            for (int r = 0; r < P; ++r) {
#pragma unroll
              for (int s = 0; s < P; ++s) {
                const acc_t xv = static_cast<acc_t>(xr[r * cols + s + j]);
#pragma unroll
                for (int c = 0; c < kCob; ++c) {
                  acc[c][r * P + s] += static_cast<acc_t>(wv[c]) * xv;
                }
              }
            }
          }
        }
      }
      // Scan in max_pool2d's order (row by row) on values rounded to T.
#pragma unroll
      for (int k = 0; k < P * P; ++k) {
#pragma unroll
        for (int c = 0; c < kCob; ++c) {
          const acc_t v = static_cast<acc_t>(static_cast<T>(acc[c][k]));
          if (pool_takes(v, best[c])) {
            best[c] = v;
            best_j[c] = k;
          }
        }
      }
    } else {
      for (int r = 0; r < pool; ++r) {
        for (int s = 0; s < pool; ++s) {
          acc_t acc[kCob];
#pragma unroll
          for (int c = 0; c < kCob; ++c) acc[c] = static_cast<acc_t>(sm.bias[c0 + c]);
          int t = 0;
          for (int ci = 0; ci < g.cin; ++ci) {
            for (int i = 0; i < g.kh; ++i) {
              const T* xr = xb + ci * plane + (r + i) * cols + s;
              for (int j = 0; j < g.kw; ++j, ++t) {
                T wv[kCob];
                load_vec(sm.weight + t * a.cgp + c0, wv);
                const acc_t xv = static_cast<acc_t>(xr[j]);
#pragma unroll
                for (int c = 0; c < kCob; ++c) acc[c] += static_cast<acc_t>(wv[c]) * xv;
              }
            }
          }
          const int32_t k = r * pool + s;
#pragma unroll
          for (int c = 0; c < kCob; ++c) {
            const acc_t v = static_cast<acc_t>(static_cast<T>(acc[c]));
            if (pool_takes(v, best[c])) {
              best[c] = v;
              best_j[c] = k;
            }
          }
        }
      }
    }
    const int cg0 = by * a.cgp;
#pragma unroll
    for (int c = 0; c < kCob; ++c) {
      const int co = cg0 + c0 + c;
      if (co < g.cout) {
        const int64_t o = (n * g.cout + co) * cells + cell;
        a.out[o] = static_cast<T>(pool_output(best[c]));
        a.indices[o] = static_cast<I>(pool_saved_index(best[c], best_j[c], pool));
      }
    }
  }
}

// Forward, tiled path (the fast path for kDenseKW-wide filters, pool 2 and a
// pooled width that is a multiple of kTileCells: both blocks of the model).
// One block = kTileImgs images, all output channels. Thread (channel group
// cg of kTileCo channels, pooled row oph, segment seg of kTileCells pooled
// columns, image img; img fastest, cg slowest) keeps in registers the
// kTileCo x 2 x 2*kTileCells convolution outputs of its pool windows. Per
// staged input row (kh + 1 of them per channel) it loads the kTileRow words
// its windows read once (three 16-byte loads) and, for each of the two
// output rows that row reaches and each filter column j, one 16-byte
// broadcast of kTileCo weights (the warp shares cg), then does
// kTileCo * 2*kTileCells FMAs with the row shifted by j: 2 * kTileCo *
// 2*kTileCells * kDenseKW FMAs per 3 + 2*kDenseKW loads, no padded channel
// (cout a multiple of kTileCo). The 8 images of a warp's lanes start 16
// bytes apart modulo the 32 banks (the plan's image stride ximg), so every
// row load is conflict-free (4 wavefronts for 32 lanes x 16 bytes). Each
// output is summed in the fast path's tap order (bias, then ci, i, j).
// Shared memory: weight[taps][cgs][4] (the 4th slot 0) | bias[cgs][4] |
//   image[kTileImgs][ximg] (rows xcols apart, channel planes
//   staged_rows * xcols apart), all T.
constexpr int kTileImgs = 8;
constexpr int kTileCo = 3;
constexpr int kTileCells = 4;
constexpr int kTileRow = 2 * kTileCells + kDenseKW - 1;

FMNIST_HD int tile_groups(const KernelGeometry& g) { return ceil_div(g.cout, kTileCo); }

FMNIST_HD size_t tiled_smem_bytes(const KernelGeometry& g, int ximg, size_t elem) {
  const size_t cgs = tile_groups(g);
  const size_t taps = static_cast<size_t>(g.cin) * g.kh * kDenseKW;
  return elem * ((taps + 1) * cgs * 4 + static_cast<size_t>(kTileImgs) * ximg);
}

template <typename T, typename I>
FMNIST_HD void fwd_tiled_stage(const FwdArgs<T, I>& a, int64_t bx, T* smem, int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const int cgs = tile_groups(g);
  const int taps = g.cin * g.kh * kDenseKW;
  T* weight = smem;
  T* bias = weight + taps * cgs * 4;
  T* image = bias + cgs * 4;
  // Weights stored as [tap][cg][4], channel fastest (conflict-free stores;
  // the reads gather the few L2 sectors of the filter bank).
  for (int e = tid; e < cgs * kTileCo * taps; e += nthreads) {
    const int co = e % (cgs * kTileCo), t = e / (cgs * kTileCo);
    weight[(t * cgs + co / kTileCo) * 4 + co % kTileCo] =
        co < g.cout ? a.weight[static_cast<int64_t>(co) * taps + t] : T(0);
  }
  for (int e = tid; e < taps * cgs; e += nthreads) weight[e * 4 + 3] = T(0);
  for (int e = tid; e < cgs * 4; e += nthreads) {
    const int co = (e / 4) * kTileCo + e % 4;
    bias[e] = (a.bias != nullptr && e % 4 < kTileCo && co < g.cout) ? a.bias[co] : T(0);
  }
  const StagedStrides s{a.ximg, staged_rows(g) * a.xcols, a.xcols};
  stage_images(g, a.input, bx * kTileImgs, kTileImgs, image, s, tid, nthreads);
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void fwd_tiled_work(const FwdArgs<T, I>& a, int64_t bx, const T* smem, int tid,
                              int nthreads) {
  const KernelGeometry& g = a.g;
  const int cgs = tile_groups(g);
  const int taps = g.cin * g.kh * kDenseKW;
  const T* weight = smem;
  const T* bias = weight + taps * cgs * 4;
  const T* image = bias + cgs * 4;
  const int rows = staged_rows(g);
  const int segs = g.pw / kTileCells;
  const int combos = g.ph * segs;
  const int cells = g.ph * g.pw;
  for (int item = tid; item < kTileImgs * combos * cgs; item += nthreads) {
    const int img = item % kTileImgs;
    const int combo = (item / kTileImgs) % combos;
    const int cg = item / (kTileImgs * combos);
    const int64_t n = bx * kTileImgs + img;
    if (n >= g.n) continue;
    const int oph = combo / segs, seg = combo % segs;
    acc_t acc[kTileCo][2][2 * kTileCells];
#pragma unroll
    for (int c = 0; c < kTileCo; ++c) {
      const acc_t b = static_cast<acc_t>(bias[cg * 4 + c]);
#pragma unroll
      for (int d = 0; d < 2; ++d) {
#pragma unroll
        for (int k = 0; k < 2 * kTileCells; ++k) acc[c][d][k] = b;
      }
    }
    const T* xb = image + img * a.ximg + 2 * oph * a.xcols + 2 * kTileCells * seg;
    for (int ci = 0; ci < g.cin; ++ci) {
      for (int r = 0; r <= g.kh; ++r) {
        T xs[kTileRow];
        load_vec(xb + (ci * rows + r) * a.xcols, xs);
#pragma unroll
        for (int d = 0; d < 2; ++d) {
          const int i = r - d;  // the filter row that input row r meets in output row d
          if (i < 0 || i >= g.kh) continue;
          const T* wr = weight + ((ci * g.kh + i) * kDenseKW * cgs + cg) * 4;
#pragma unroll
          for (int j = 0; j < kDenseKW; ++j) {
            T wv[4];
            load_vec(wr + j * cgs * 4, wv);
#pragma unroll
            for (int c = 0; c < kTileCo; ++c) {
#pragma unroll
              for (int k = 0; k < 2 * kTileCells; ++k) {
                acc[c][d][k] += static_cast<acc_t>(wv[c]) * static_cast<acc_t>(xs[k + j]);
              }
            }
          }
        }
      }
    }
    // Scan each window in max_pool2d's order (row by row) on values rounded to T.
#pragma unroll
    for (int c = 0; c < kTileCo; ++c) {
      const int co = cg * kTileCo + c;
      if (co >= g.cout) continue;
#pragma unroll
      for (int k = 0; k < kTileCells; ++k) {
        acc_t best = -static_cast<acc_t>(INFINITY);
        int32_t best_j = 0;
#pragma unroll
        for (int d = 0; d < 2; ++d) {
#pragma unroll
          for (int s = 0; s < 2; ++s) {
            const acc_t v = static_cast<acc_t>(static_cast<T>(acc[c][d][2 * k + s]));
            if (pool_takes(v, best)) {
              best = v;
              best_j = d * 2 + s;
            }
          }
        }
        const int64_t o = (n * g.cout + co) * cells + oph * g.pw + seg * kTileCells + k;
        a.out[o] = static_cast<T>(pool_output(best));
        a.indices[o] = static_cast<I>(pool_saved_index(best, best_j, 2));
      }
    }
  }
}

// Forward, direct path (any size): one thread per pooled output, reading
// global memory. `o` is the flat output index.
template <typename T, typename acc_t, typename I>
FMNIST_HD void fwd_direct_item(const FwdArgs<T, I>& a, int64_t o) {
  const KernelGeometry& g = a.g;
  const int64_t cells = static_cast<int64_t>(g.ph) * g.pw;
  const int64_t cell = o % cells;
  const int co = static_cast<int>((o / cells) % g.cout);
  const int64_t n = o / (cells * g.cout);
  const int oph = static_cast<int>(cell / g.pw), opw = static_cast<int>(cell % g.pw);
  const int pool = g.pool;
  const T* wb = a.weight + static_cast<int64_t>(co) * g.cin * g.kh * g.kw;
  const acc_t b = a.bias != nullptr ? static_cast<acc_t>(a.bias[co]) : acc_t(0);
  acc_t best = -static_cast<acc_t>(INFINITY);
  int32_t best_j = 0;
  for (int r = 0; r < pool; ++r) {
    for (int s = 0; s < pool; ++s) {
      const int oh = oph * pool + r, ow = opw * pool + s;
      acc_t acc = b;
      for (int ci = 0; ci < g.cin; ++ci) {
        const T* xc = a.input + (n * g.cin + ci) * g.h * g.w;
        for (int i = 0; i < g.kh; ++i) {
          const int y = oh + i - g.pad_h;
          if (y < 0 || y >= g.h) continue;
          for (int j = 0; j < g.kw; ++j) {
            const int x = ow + j - g.pad_w;
            if (x < 0 || x >= g.w) continue;
            acc += static_cast<acc_t>(wb[(ci * g.kh + i) * g.kw + j]) *
                   static_cast<acc_t>(xc[static_cast<int64_t>(y) * g.w + x]);
          }
        }
      }
      const acc_t v = static_cast<acc_t>(static_cast<T>(acc));
      if (pool_takes(v, best)) {
        best = v;
        best_j = r * pool + s;
      }
    }
  }
  a.out[o] = static_cast<T>(pool_output(best));
  a.indices[o] = static_cast<I>(pool_saved_index(best, best_j, pool));
}

}  // namespace cuda
}  // namespace fmnist_ext
