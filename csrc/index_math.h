// Index math shared by the CPU and CUDA kernels of conv_relu_maxpool2d.
//
// Everything here is a __host__ __device__ inline function (FMNIST_HD, see
// host_device.h) of plain integers, so the CPU build (and therefore the CPU
// test suite) exercises exactly the code the CUDA kernels use.
//
// Conventions (the same as the stock conv2d -> relu -> max_pool2d sequence):
//   conv output size  O = (n + 2p - f) / 1 + 1          (stride 1, dilation 1)
//   pooled size       Q = O / k                         (window k, stride k, floor)
//   only the rows/columns [0, Q*k) of the convolution are ever needed.
//   The "winner" of a pool window is stored as its position j = r*k + c inside
//   the window (r, c in [0, k)), scanned row by row like max_pool2d scans it.
//   The value k*k means "no gradient flows": the window maximum after ReLU was
//   <= 0 (and not NaN), so relu's backward zeroes it.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fmnist_ext {

// Output size of a stride-1, dilation-1 convolution along one axis.
FMNIST_HD int64_t conv_out_size(int64_t in, int64_t kernel, int64_t pad) {
  return in + 2 * pad - kernel + 1;
}

// Output size of max pooling with window k and stride k (floor mode).
FMNIST_HD int64_t pool_out_size(int64_t conv_out, int64_t k) { return conv_out / k; }

// The saved-index value meaning "this window passes no gradient".
FMNIST_HD int32_t no_grad_index(int64_t pool) { return static_cast<int32_t>(pool * pool); }

// True when a saved index names a position inside the pool window (0 ..
// pool*pool - 1). The no-gradient marker and anything else (an indices tensor
// not made by the forward: out of range, negative) is false: such a window
// contributes no gradient, and the kernels never index with it.
FMNIST_HD bool winner_in_window(int32_t j, int32_t no_grad) {
  return static_cast<uint32_t>(j) < static_cast<uint32_t>(no_grad);
}

// Largest pool window whose positions plus the no-gradient marker fit in uint8.
constexpr int64_t kMaxPoolForUint8Index = 15;  // 15*15 = 225 < 255

// Row/column of the convolution output that window position j of pooled
// cell (ph, pw) refers to.
FMNIST_HD int64_t winner_row(int64_t ph, int32_t j, int64_t pool) {
  return ph * pool + j / static_cast<int32_t>(pool);
}
FMNIST_HD int64_t winner_col(int64_t pw, int32_t j, int64_t pool) {
  return pw * pool + j % static_cast<int32_t>(pool);
}

// The pool scan runs on pre-activation values with max_pool2d's rule: a
// strictly larger value or a NaN replaces the running maximum (so the first
// maximum in scan order wins and NaN propagates; the last NaN wins, as in
// ATen). Start from -inf and position 0.
template <typename T>
FMNIST_HD bool pool_takes(T v, T best) {
  return (v > best) | (v != v);
}

// The pool cells whose convolution rows (or columns) can read padded input
// row (or column) `yp` through a filter of size `k`: the convolution rows
// yp - k + 1 .. yp lie in cells first_cell_reaching .. last_cell_reaching
// (clamp the last to the pooled size). Used by the gather formulation of
// grad_input in the CUDA kernels.
FMNIST_HD int32_t first_cell_reaching(int64_t yp, int64_t k, int64_t pool) {
  const int64_t lo = yp - k + 1;
  return static_cast<int32_t>(lo <= 0 ? 0 : lo / pool);
}
FMNIST_HD int32_t last_cell_reaching(int64_t yp, int64_t pool) {
  return static_cast<int32_t>(yp / pool);
}

// ReLU applied after the scan gives exactly relu-then-pool: when the maximum
// is > 0 or NaN the ReLU changed nothing the scan compared; when it is <= 0
// the output is 0 and relu's backward passes no gradient (NaN <= 0 is false,
// so a NaN maximum passes its gradient, like stock).
template <typename T>
FMNIST_HD bool pool_passes_gradient(T best) {
  return !(best <= T(0));
}
template <typename T>
FMNIST_HD T pool_output(T best) {
  return pool_passes_gradient(best) ? best : T(0);
}
template <typename T>
FMNIST_HD int32_t pool_saved_index(T best, int32_t best_j, int64_t pool) {
  return pool_passes_gradient(best) ? best_j : no_grad_index(pool);
}

}  // namespace fmnist_ext
