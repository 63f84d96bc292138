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
  stage_images(g, a.input, bx * a.imgs, a.imgs, sm.image, tid, nthreads);
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
