// Interface between the CPU op (conv_relu_maxpool2d_kernel.cpp) and the
// per-instruction-set builds of the CPU kernels (isa_*.cpp, which all include
// kernels.h). Plain structs, declarations and internal-linkage helpers
// only: the ISA translation units must not share inline code with external
// linkage with the rest of the library (see host_device.h).
#pragma once

#include <cstdint>

#include "../geometry.h"
#include "../host_device.h"

namespace fmnist_ext {
namespace cpu {

template <typename T, typename I>
struct ForwardArgs {
  ConvPoolGeometry g;
  const T* input;            // strided: any layout
  int64_t input_strides[4];  // of input (N, C, H, W), in elements
  const T* weight;           // [cout, cin, kh, kw] contiguous
  const T* bias;             // [cout] or nullptr
  T* out;                    // [N, cout, ph, pw] contiguous
  I* indices;                // [N, cout, ph, pw] contiguous
};

template <typename T, typename I>
struct BackwardArgs {
  ConvPoolGeometry g;
  const T* input;            // strided: any layout
  int64_t input_strides[4];  // of input (N, C, H, W), in elements
  const T* weight;           // [cout, cin, kh, kw] contiguous
  const T* grad_out;         // [N, cout, ph, pw] contiguous
  const I* indices;          // [N, cout, ph, pw] contiguous
  T* grad_input;             // [N, cin, h, w] contiguous, or nullptr
  // Per-worker partial sums, each owned by one worker at a time:
  T* grad_weight_part;  // [cout, cin, kh, padded_kw(kw)]  (nullptr: not needed)
  T* grad_bias_part;    // [cout]               (nullptr: not needed)
};

// The kernels work on 32-byte vectors (8 floats / 4 doubles) in every build.
template <typename T>
static constexpr int64_t vector_lanes() {
  return 32 / sizeof(T);
}

// Filter rows of the grad_weight partial sums are padded to whole vectors, so
// the kernels add whole vectors (no partly overlapping stores).
template <typename T>
FMNIST_HD int64_t padded_kw(int64_t kw) {
  return round_up(kw, vector_lanes<T>());
}

// Entry points of one ISA build: process images [n0, n1).
#define FMNIST_DECLARE_ISA(ns)                                               \
  namespace ns {                                                             \
  template <typename T, typename I>                                          \
  void forward_images(const ForwardArgs<T, I>& a, int64_t n0, int64_t n1);   \
  template <typename T, typename I>                                          \
  void backward_images(const BackwardArgs<T, I>& a, int64_t n0, int64_t n1); \
  }

FMNIST_DECLARE_ISA(isa_default)
#if defined(FMNIST_HAVE_X86_ISAS)
FMNIST_DECLARE_ISA(isa_avx2)
FMNIST_DECLARE_ISA(isa_avx512)
#endif

#undef FMNIST_DECLARE_ISA

}  // namespace cpu
}  // namespace fmnist_ext
