// The per-thread and per-block work of the CUDA kernels of
// conv_relu_maxpool2d (see conv_relu_maxpool2d_kernel.cu for the design).
//
// Everything here is __host__ __device__ and free of ATen. The __global__
// kernels (kernels_global.cuh) run these phases with __syncthreads() between
// them; the same kernels are compiled by nvcc for the GPU and by a host C++
// compiler for the execution harness in tests/cuda_emulation, which runs the
// threads of a block concurrently with a real barrier.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../geometry.h"
#include "../host_device.h"
#include "../index_math.h"

namespace fmnist_ext {
namespace cuda {

// The geometry the kernels and launch plans work with: the call's
// ConvPoolGeometry with the per-image sizes narrowed to int. The work-item
// decompositions below do several integer divisions and remainders per item,
// and 32-bit ones cost a fraction of 64-bit ones on the GPU (and half the
// registers). The host code checks that one image, one convolution output
// and one filter bank fit (check_sizes_fit in conv_relu_maxpool2d_kernel.cu);
// the batch stays int64_t, and every offset into global memory is formed in
// int64_t. This is the only place the narrowing happens.
using KernelGeometry = ConvPoolGeometryOf<int>;

FMNIST_HD KernelGeometry kernel_geometry(const ConvPoolGeometry& g) {
  KernelGeometry k;
  k.n = g.n;
  k.cin = static_cast<int>(g.cin);
  k.h = static_cast<int>(g.h);
  k.w = static_cast<int>(g.w);
  k.cout = static_cast<int>(g.cout);
  k.kh = static_cast<int>(g.kh);
  k.kw = static_cast<int>(g.kw);
  k.pad_h = static_cast<int>(g.pad_h);
  k.pad_w = static_cast<int>(g.pad_w);
  k.pool = static_cast<int>(g.pool);
  k.oh = static_cast<int>(g.oh);
  k.ow = static_cast<int>(g.ow);
  k.ph = static_cast<int>(g.ph);
  k.pw = static_cast<int>(g.pw);
  return k;
}

// The staged (zero-padded) image of the fast paths: the rows and columns of
// the padded input that the convolution outputs reaching the pool read.
FMNIST_HD int staged_rows(const KernelGeometry& g) { return g.ph * g.pool + g.kh - 1; }
FMNIST_HD int staged_cols(const KernelGeometry& g) { return g.pw * g.pool + g.kw - 1; }

// A pointer to E in shared memory carved from `Byte* smem`: const when the
// phase only reads (Byte = const unsigned char).
template <typename Byte, typename E>
using SmemPtr = std::conditional_t<std::is_const_v<Byte>, const E*, E*>;

// Threads per block never exceed this (launch plans in plan.h; also the
// kernels' __launch_bounds__).
constexpr int kMaxThreads = 256;
// Channels computed per thread by the forward fast kernel (register block).
constexpr int kCob = 4;
// Input channels accumulated per thread by the grad_input kernel.
constexpr int kCib = 4;

// Zero-padded staging of images [n0, n0 + imgs) into smem:
//   image[img][ci][r][c] = input[n0 + img][ci][r - pad_h][c - pad_w]  (0 outside)
// for r < staged_rows(g), c < staged_cols(g); input is contiguous NCHW.
// Images past the batch are 0.
template <typename T>
FMNIST_HD void stage_images(const KernelGeometry& g, const T* __restrict__ input, int64_t n0,
                            int imgs, T* image, int tid, int nthreads) {
  const int rows = staged_rows(g), cols = staged_cols(g);
  const int plane = rows * cols;
  const int total = imgs * g.cin * plane;
  for (int e = tid; e < total; e += nthreads) {
    const int c = e % cols;
    const int r = (e / cols) % rows;
    const int ic = e / plane;  // img * cin + ci
    const int64_t n = n0 + ic / g.cin;
    const int y = r - g.pad_h, x = c - g.pad_w;
    T v = T(0);
    if (n < g.n && y >= 0 && y < g.h && x >= 0 && x < g.w) {
      v = input[((n0 * g.cin + ic) * g.h + y) * g.w + x];
    }
    image[e] = v;
  }
}

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

// Loads N adjacent shared-memory values (16-byte vector loads on the GPU;
// p is 16-byte aligned whenever N is a multiple of the vector width).
template <typename T, int N>
FMNIST_HD void load_vec(const T* p, T (&v)[N]) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == 4 && N % 4 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + k);
      v[k] = f.x;
      v[k + 1] = f.y;
      v[k + 2] = f.z;
      v[k + 3] = f.w;
    }
  } else if constexpr (sizeof(T) == 8 && N % 2 == 0) {
#pragma unroll
    for (int k = 0; k < N; k += 2) {
      const double2 d = *reinterpret_cast<const double2*>(p + k);
      v[k] = d.x;
      v[k + 1] = d.y;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = p[k];
  }
#elif defined(FMNIST_EMU_LOAD_VEC)
  FMNIST_EMU_LOAD_VEC(p, v);  // the counting harness: one access per GPU vector load
#else
  for (int k = 0; k < N; ++k) v[k] = p[k];
#endif
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
constexpr int kDenseKW = 5;
constexpr int kDenseGW = 8;
constexpr int kDenseRows = 6;

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
  const int cells = g.ph * g.pw;
  const int64_t n0 = tile * a.imgs;
  for (int e = tid; e < a.imgs * per_img; e += nthreads) {
    const int img = e / per_img, r = e % per_img;
    const int rx = r % kDenseGW;
    const int rd = (r / kDenseGW) % gh;
    const int co = r / (kDenseGW * gh);
    const int64_t n = n0 + img;
    T v = T(0);
    if (n < g.n) {
      const int oph = rd / g.pool, opw = rx / g.pool;
      const int64_t src = (n * g.cout + co) * cells + oph * g.pw + opw;
      const int32_t j = static_cast<int32_t>(a.indices[src]);
      if (winner_in_window(j, no_grad_index(g.pool)) && winner_row(oph, j, g.pool) == rd &&
          winner_col(opw, j, g.pool) == rx) {
        v = a.grad_out[src];
      }
    }
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
// 2. reduce_partials: one thread per element adds the rows in row order and
//    writes grad_weight / grad_bias (every requested element is written).
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
  // The dense kernel's staged image strides (elements): row, channel plane.
  int xcols = 0, xplane = 0;
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
  if (a.grad_weight != nullptr) stage_images(g, a.input, n0, a.imgs, sm.image, tid, nthreads);
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
// grad_weight / grad_bias, dense (the fast path for kDenseKW-wide filters
// and kWDenseCout output channels: block 2 of the model): step 1 of the
// scheme above as a dense product. With D the gradient of the convolution
// output over the pooled region (g at each winner, 0 elsewhere, as for the
// dense grad_input) and x the staged padded image,
//   grad_weight[co][ci][i][j] = sum over positions (py, px) of the pooled
//   region of D[co][py][px] * x[ci][py + i][px + j],  grad_bias[co] = sum D.
// Per chunk the block stages x (rows xcols apart, channel planes xplane
// apart: strides the plan picks so the lanes of a warp read distinct banks)
// and D as [img][position][co]. Thread (slice s, ci, i) keeps in registers
// the kWDenseCout x kDenseKW weights (co, ci, i, 0..kDenseKW) over ALL its
// chunks (images s, s + S, ... of each): per position one 16-byte broadcast
// load per 4 channels of D, kDenseKW words of x, kWDenseCout * kDenseKW
// FMAs; lane r = ci * kh + i < kWDenseCout also sums the bias of channel r
// (one more pass over D per image). Lanes: a warp holds 32 / (cin*kh)
// slices, lane = (slice, ci, i). After the last chunk the registers go to
// slice_sum[S][E] (aliasing the staging area) and bwd_weight_flush writes
// the block's row of partials in slice order; reduce_partials as above. The
// order of every sum depends only on the plan: bitwise reproducible.
// Shared memory: x[imgs][cin][xplane] | D[imgs][gh * gw][kWDenseCout] (T),
//   or, after the last chunk, slice_sum[S][E] (acc_t).
constexpr int kWDenseCout = 12;

template <typename T, typename acc_t, typename I, typename Byte>
FMNIST_HD SmemPtr<Byte, T> wdense_d(const BwdWeightArgs<T, acc_t, I>& a, Byte* smem) {
  const int64_t x = round_up(static_cast<int64_t>(a.imgs) * a.g.cin * a.xplane, 4);
  return reinterpret_cast<SmemPtr<Byte, T>>(smem) + x;
}

FMNIST_HD size_t wdense_smem_bytes(const KernelGeometry& g, int imgs, int xplane, int slices,
                                   size_t elem, size_t acc_elem) {
  const size_t positions = static_cast<size_t>(g.ph) * g.pool * g.pw * g.pool;
  const size_t staged = elem * (round_up(static_cast<size_t>(imgs) * g.cin * xplane, size_t(4)) +
                                static_cast<size_t>(imgs) * positions * kWDenseCout);
  const size_t sums = acc_elem * static_cast<size_t>(slices) * bwd_weight_elems(g);
  return staged > sums ? staged : sums;
}

// Slices held by one warp: lanes (slice, ci, i).
FMNIST_HD int wdense_slices_per_warp(const KernelGeometry& g) { return 32 / (g.cin * g.kh); }

template <typename T, typename acc_t, typename I>
FMNIST_HD void wdense_stage(const BwdWeightArgs<T, acc_t, I>& a, int64_t chunk, unsigned char* smem,
                            int tid, int nthreads) {
  const KernelGeometry& g = a.g;
  const int64_t n0 = chunk * a.imgs;
  T* x = reinterpret_cast<T*>(smem);
  if (a.grad_weight != nullptr) {
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
  T* d = wdense_d(a, smem);
  const int gw = g.pw * g.pool, gh = g.ph * g.pool;
  const int cells = g.ph * g.pw;
  const int total = a.imgs * gh * gw * kWDenseCout;
  for (int e = tid; e < total; e += nthreads) {
    const int co = e % kWDenseCout;
    const int pos = (e / kWDenseCout) % (gh * gw);
    const int img = e / (kWDenseCout * gh * gw);
    const int py = pos / gw, px = pos % gw;
    const int64_t n = n0 + img;
    T v = T(0);
    if (n < g.n) {
      const int oph = py / g.pool, opw = px / g.pool;
      const int64_t src = (n * g.cout + co) * cells + oph * g.pw + opw;
      const int32_t j = static_cast<int32_t>(a.indices[src]);
      if (winner_in_window(j, no_grad_index(g.pool)) && winner_row(oph, j, g.pool) == py &&
          winner_col(opw, j, g.pool) == px) {
        v = a.grad_out[src];
      }
    }
    d[e] = v;
  }
}

// A thread's registers (dense grad_weight): its weights and, on lanes
// r = ci * kh + i < kWDenseCout, the bias of channel r (plan: cin * kh >=
// kWDenseCout).
template <typename acc_t>
struct WDenseAcc {
  acc_t w[kWDenseCout][kDenseKW];
  acc_t b;
};

template <typename acc_t>
FMNIST_HD void wdense_zero(WDenseAcc<acc_t>& acc) {
  acc.b = acc_t(0);
#pragma unroll
  for (int co = 0; co < kWDenseCout; ++co) {
#pragma unroll
    for (int j = 0; j < kDenseKW; ++j) acc.w[co][j] = acc_t(0);
  }
}

// The thread's lane: slice s (-1: idle lane), ci, i.
struct WDenseLane {
  int s, ci, i;
};

FMNIST_HD WDenseLane wdense_lane(const KernelGeometry& g, int tid) {
  const int per = g.cin * g.kh;
  const int q = wdense_slices_per_warp(g);
  const int lane = tid % 32, k = lane / per, r = lane % per;
  if (k >= q) return {-1, 0, 0};
  return {(tid / 32) * q + k, r / g.kh, r % g.kh};
}

template <typename T, typename acc_t, typename I>
FMNIST_HD void wdense_accumulate(const BwdWeightArgs<T, acc_t, I>& a, const unsigned char* smem,
                                 WDenseLane L, WDenseAcc<acc_t>& acc) {
  const KernelGeometry& g = a.g;
  if (L.s < 0) return;
  const T* x = reinterpret_cast<const T*>(smem);
  const T* d = wdense_d(a, smem);
  const int gw = g.pw * g.pool, gh = g.ph * g.pool;
  const bool want_w = a.grad_weight != nullptr;
  for (int img = L.s; img < a.imgs; img += a.slices) {
    const T* dimg = d + img * gh * gw * kWDenseCout;
    const T* ximg = x + (img * g.cin + L.ci) * a.xplane + L.i * a.xcols;
    for (int py = 0; py < gh; ++py) {
      for (int px = 0; px < gw; ++px) {
        if (!want_w) continue;
        T dv[kWDenseCout];
        load_vec(dimg + (py * gw + px) * kWDenseCout, dv);
        T xv[kDenseKW];
#pragma unroll
        for (int j = 0; j < kDenseKW; ++j) xv[j] = ximg[py * a.xcols + px + j];
#pragma unroll
        for (int co = 0; co < kWDenseCout; ++co) {
          const acc_t dc = static_cast<acc_t>(dv[co]);
#pragma unroll
          for (int j = 0; j < kDenseKW; ++j) acc.w[co][j] += dc * static_cast<acc_t>(xv[j]);
        }
      }
    }
    // The bias of channel r: every lane runs the loop (uniform), lanes
    // r >= kWDenseCout repeat a channel's loads and discard the sum.
    const int r = (L.ci * g.kh + L.i) % kWDenseCout;
    for (int pos = 0; pos < gh * gw; ++pos)
      acc.b += static_cast<acc_t>(dimg[pos * kWDenseCout + r]);
  }
}

// After the last chunk (the staging area is free): the registers to
// slice_sum[s][e]; every element of every slice is written.
template <typename T, typename acc_t, typename I>
FMNIST_HD void wdense_store(const BwdWeightArgs<T, acc_t, I>& a, unsigned char* smem, WDenseLane L,
                            const WDenseAcc<acc_t>& acc) {
  const KernelGeometry& g = a.g;
  if (L.s < 0) return;
  acc_t* row = reinterpret_cast<acc_t*>(smem) + L.s * bwd_weight_elems(g);
  const int nw = g.cout * g.cin * g.kh * kDenseKW;
#pragma unroll
  for (int co = 0; co < kWDenseCout; ++co) {
#pragma unroll
    for (int j = 0; j < kDenseKW; ++j) {
      row[((co * g.cin + L.ci) * g.kh + L.i) * kDenseKW + j] = acc.w[co][j];
    }
  }
  const int r = L.ci * g.kh + L.i;
  if (r < kWDenseCout) row[nw + r] = acc.b;
}

// Step 2: element e of grad_weight (e < nw) or grad_bias = the rows of
// partials added in row order.
template <typename T, typename acc_t, typename I>
FMNIST_HD void reduce_partials_item(const BwdWeightArgs<T, acc_t, I>& a, int64_t rows, int e) {
  const int ne = bwd_weight_elems(a.g);
  const int nw = ne - a.g.cout;
  T* dst = e < nw ? a.grad_weight : a.grad_bias;
  if (dst == nullptr) return;
  acc_t sum = acc_t(0);
  for (int64_t r = 0; r < rows; ++r) sum += a.partials[r * ne + e];
  dst[e < nw ? e : e - nw] = static_cast<T>(sum);
}

}  // namespace cuda
}  // namespace fmnist_ext
