// The building blocks every CPU kernel header uses: 32-byte vectors, their
// unaligned loads/stores and broadcasts, per-call scratch memory, and the
// zero-padded copy of one image that the forward and the planar grad_weight
// read.
//
// Part of one instruction-set build of the CPU kernels (kernels.h): compiled
// once per ISA, so the vectors below become AVX/AVX-512VL instructions where
// the including isa_*.cpp is compiled for them and pairs of SSE2
// instructions otherwise. Everything has internal linkage (an anonymous
// namespace inside fmnist_ext::cpu::FMNIST_ISA) and no ATen/c10 header is
// included, so no inline code compiled with wider instructions can leak into
// the rest of the library.
//
// Memory traffic: load_padded_image reads an image once (any strides) and
// writes it once into a buffer of a few KB that stays in L1; Scratch is one
// allocation per call, never per image.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "../host_device.h"
#include "../index_math.h"
#include "isa.h"

#if !defined(FMNIST_ISA)
#error "define FMNIST_ISA (the build's namespace) before including the CPU kernels (kernels.h)"
#endif

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

// 32-byte SIMD vectors through the GCC/Clang vector extension: the compiler
// emits AVX/AVX-512VL instructions where this file is compiled for them and
// pairs of SSE2 instructions otherwise.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t M __attribute__((vector_size(32)));
  typedef int32_t MElem;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef int64_t M __attribute__((vector_size(32)));
  typedef int64_t MElem;
};

template <typename V, typename T>
inline V loadu(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename T, typename V>
inline void storeu(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
inline V splat(T s) {
  if constexpr (vector_lanes<T>() == 8) {
    return V{s, s, s, s, s, s, s, s};
  } else {
    return V{s, s, s, s};
  }
}

// Scratch memory for one call, released on scope exit. The sizes are small
// (a few images' worth), so one allocation per call is enough.
template <typename T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    // 64-byte aligned, so vectors at multiples of 32 bytes never split a cache line.
    const size_t bytes = round_up(sizeof(T) * static_cast<size_t>(imax(n, 1)) + 64, size_t{64});
    p = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!p) throw std::bad_alloc();
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Zero-padded copy of image n: xp[ci][r][c] = input[n][ci][r - pad_h][c - pad_w]
// for r < hp, c < ws (zero outside the image); `strides` are input's (N, C,
// H, W) strides.
template <typename T>
void load_padded_image(const ConvPoolGeometry& g, const T* input, const int64_t* strides, int64_t n,
                       T* xp, int64_t hp, int64_t ws) {
  std::memset(xp, 0, sizeof(T) * static_cast<size_t>(g.cin * hp * ws));
  const int64_t sn = strides[0], sc = strides[1];
  const int64_t sh = strides[2], sw = strides[3];
  const int64_t r_end = imin(hp, g.h + g.pad_h);
  for (int64_t ci = 0; ci < g.cin; ++ci) {
    const T* src_c = input + n * sn + ci * sc;
    T* dst_c = xp + ci * hp * ws;
    for (int64_t r = g.pad_h; r < r_end; ++r) {
      const T* src = src_c + (r - g.pad_h) * sh;
      T* dst = dst_c + r * ws + g.pad_w;
      if (sw == 1) {
        std::memcpy(dst, src, sizeof(T) * static_cast<size_t>(g.w));
      } else {
        for (int64_t c = 0; c < g.w; ++c) dst[c] = src[c * sw];
      }
    }
  }
}

}  // namespace
}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
