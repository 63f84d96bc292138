// The geometry of one conv_relu_maxpool2d call: the one description of the
// sizes that the argument checks fill (checks.h) and every backend consumes
// (the CPU kernels through cpu/isa.h, the CUDA kernels and their launch plans,
// the execution harness in tests/cuda_emulation).
//
// A plain struct, free of ATen, with no member functions, so that it can be
// passed to CUDA kernels by value and shared with the per-instruction-set CPU
// builds (see host_device.h for why those share no inline code with external
// linkage).
#pragma once

#include <cstdint>

#include "host_device.h"
#include "index_math.h"

namespace fmnist_ext {

// `Int` is the type of the per-image sizes: int64_t everywhere
// (ConvPoolGeometry), except inside the CUDA kernels, which index one image
// and one filter bank with int (cuda/kernels.cuh derives that copy, and says
// why, in kernel_geometry()). The batch is int64_t in both.
template <typename Int>
struct ConvPoolGeometryOf {
  int64_t n;               // batch
  Int cin, h, w;           // input image
  Int cout, kh, kw;        // filter bank
  Int pad_h, pad_w, pool;  // zero padding; pool window = pool stride
  Int oh, ow;              // convolution output (un-pooled)
  Int ph, pw;              // pooled output
};

using ConvPoolGeometry = ConvPoolGeometryOf<int64_t>;

// The geometry of input [n, cin, h, w] and weight [cout, cin, kh, kw] with
// the given padding and pool window; the output sizes follow index_math.h.
// No checks: the caller has validated the sizes (checks.h) or built them.
FMNIST_HD ConvPoolGeometry make_geometry(int64_t n, int64_t cin, int64_t h, int64_t w, int64_t cout,
                                         int64_t kh, int64_t kw, int64_t pad_h, int64_t pad_w,
                                         int64_t pool) {
  ConvPoolGeometry g;
  g.n = n;
  g.cin = cin;
  g.h = h;
  g.w = w;
  g.cout = cout;
  g.kh = kh;
  g.kw = kw;
  g.pad_h = pad_h;
  g.pad_w = pad_w;
  g.pool = pool;
  g.oh = conv_out_size(h, kh, pad_h);
  g.ow = conv_out_size(w, kw, pad_w);
  g.ph = pool_out_size(g.oh, pool);
  g.pw = pool_out_size(g.ow, pool);
  return g;
}

}  // namespace fmnist_ext
