// The one host/device function macro and the small integer helpers that the
// CPU kernels, the CUDA kernels, the launch plans and the execution harness
// all use (one definition, so they cannot drift apart).
#pragma once

#include <cstdint>
#include <type_traits>

// FMNIST_HD marks a free function callable from host and device code.
// `static` gives every such function internal linkage: the CPU kernels are
// compiled several times with different instruction-set flags (see
// cpu/isa_*.cpp), and a shared inline definition could otherwise be merged
// across them by the linker and run AVX-512 code on a CPU without it. (So it
// is for free functions only; the structs these headers share have no member
// functions.)
#if defined(__CUDACC__) || defined(__HIPCC__)
#define FMNIST_HD static __host__ __device__ __forceinline__
#else
#define FMNIST_HD static inline
#endif

namespace fmnist_ext {

// Mixed operand types (an int tile size and an int64_t extent) compute in
// their common type, as the built-in operators would.
template <typename A, typename B>
FMNIST_HD std::common_type_t<A, B> ceil_div(A a, B b) {
  return (a + b - 1) / b;
}
template <typename A, typename B>
FMNIST_HD std::common_type_t<A, B> round_up(A a, B b) {
  return ceil_div(a, b) * b;
}
template <typename A, typename B>
FMNIST_HD std::common_type_t<A, B> imin(A a, B b) {
  return a < b ? a : b;
}
template <typename A, typename B>
FMNIST_HD std::common_type_t<A, B> imax(A a, B b) {
  return a > b ? a : b;
}

}  // namespace fmnist_ext
