// Interface between the CPU op (conv_relu_maxpool2d_kernel.cpp) and the
// per-instruction-set builds of the CPU kernels (isa_*.cpp, which all include
// kernels_impl.h). Plain structs and declarations only: the ISA translation
// units must not share inline code with the rest of the library.
#pragma once

#include <cstdint>

namespace fmnist_ext {
namespace cpu {

// Geometry of one call, in elements.
struct Geometry {
  int64_t cin, h, w;        // input image
  int64_t in_strides[4];    // strides of input (N, C, H, W); any layout
  int64_t cout, kh, kw;     // filter bank
  int64_t pad_h, pad_w, pool;
  int64_t ph, pw;           // pooled output size
};

template <typename T, typename I>
struct ForwardArgs {
  Geometry g;
  const T* input;     // strided, see g.in_strides
  const T* weight;    // [cout, cin, kh, kw] contiguous
  const T* bias;      // [cout] or nullptr
  T* out;             // [N, cout, ph, pw] contiguous
  I* indices;         // [N, cout, ph, pw] contiguous
};

template <typename T, typename I>
struct BackwardArgs {
  Geometry g;
  const T* input;        // strided, see g.in_strides
  const T* weight;       // [cout, cin, kh, kw] contiguous
  const T* grad_out;     // [N, cout, ph, pw] contiguous
  const I* indices;      // [N, cout, ph, pw] contiguous
  T* grad_input;         // [N, cin, h, w] contiguous, or nullptr
  // Per-worker partial sums, each owned by one worker at a time:
  T* grad_weight_part;   // [cout, cin, kh, padded_kw(kw)]  (nullptr: not needed)
  T* grad_bias_part;     // [cout]               (nullptr: not needed)
};

// The kernels work on 32-byte vectors (8 floats / 4 doubles) in every build.
template <typename T>
constexpr int64_t vector_lanes() { return 32 / sizeof(T); }

// Filter rows of the grad_weight partial sums are padded to whole vectors, so
// the kernels add whole vectors (no partly overlapping stores).
template <typename T>
constexpr int64_t padded_kw(int64_t kw) {
  return (kw + vector_lanes<T>() - 1) / vector_lanes<T>() * vector_lanes<T>();
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
