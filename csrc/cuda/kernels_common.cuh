// What the block phases of the CUDA kernels share (kernels.cuh lists the
// parts): the int geometry, shared-memory carving, image staging and the
// 16-byte vector loads. __host__ __device__ and free of ATen, like every part.
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
// The filter width of the model's blocks, which the fast paths of the
// forward and both gradients compile in (kernels_*.cuh).
constexpr int kDenseKW = 5;

// Where a staged image's elements go in smem (element strides): image,
// channel plane, row. packed_strides: one after another, no gaps.
struct StagedStrides {
  int img, plane, row;
};

FMNIST_HD StagedStrides packed_strides(const KernelGeometry& g) {
  const int plane = staged_rows(g) * staged_cols(g);
  return {g.cin * plane, plane, staged_cols(g)};
}

// Zero-padded staging of images [n0, n0 + imgs) into smem:
//   image[img * s.img + ci * s.plane + r * s.row + c] =
//     input[n0 + img][ci][r - pad_h][c - pad_w]  (0 outside)
// for r < staged_rows(g), c < staged_cols(g); input is contiguous NCHW.
// Images past the batch are 0; the gaps the strides leave are not written.
template <typename T>
FMNIST_HD void stage_images(const KernelGeometry& g, const T* __restrict__ input, int64_t n0,
                            int imgs, T* image, StagedStrides s, int tid, int nthreads) {
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
    image[(ic / g.cin) * s.img + (ic % g.cin) * s.plane + r * s.row + c] = v;
  }
}

// The gradient of the convolution output at (py, px) of image n's pooled
// region (rows < ph * pool, columns < pw * pool), channel co, through the
// pool: g at its window's winner, 0 at the other positions of the window and
// for a winner index outside the window (no gradient). What the dense
// backward kernels stage as D.
template <typename T, typename I>
FMNIST_HD T grad_at_position(const KernelGeometry& g, const T* __restrict__ grad_out,
                             const I* __restrict__ indices, int64_t n, int co, int py, int px) {
  const int oph = py / g.pool, opw = px / g.pool;
  const int64_t src = (n * g.cout + co) * (g.ph * g.pw) + oph * g.pw + opw;
  const int32_t j = static_cast<int32_t>(indices[src]);
  const bool winner = winner_in_window(j, no_grad_index(g.pool)) &&
                      winner_row(oph, j, g.pool) == py && winner_col(opw, j, g.pool) == px;
  return winner ? grad_out[src] : T(0);
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

}  // namespace cuda
}  // namespace fmnist_ext
