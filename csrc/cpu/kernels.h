// CPU kernels of conv_relu_maxpool2d, forward and backward: one
// instruction-set build.
//
// isa_default.cpp, isa_avx2.cpp and isa_avx512.cpp each define FMNIST_ISA
// (the build's namespace) and the register blocking (FMNIST_COB, FMNIST_NV,
// FMNIST_COB2), then include this header, so the kernels are compiled once
// per instruction set; the op picks the best build the CPU supports at run
// time. The kernel headers include no ATen/c10 header and define everything
// with internal linkage (an anonymous namespace inside
// fmnist_ext::cpu::FMNIST_ISA) except the two entry points declared in
// isa.h, so no inline code compiled with wider instructions can leak into
// the rest of the library. Include them only through this header, from an
// isa_*.cpp.
//
// Parallel decomposition: the caller splits the batch across threads
// (at::parallel_for); each call here processes a contiguous range of images
// with private scratch, so there is no synchronisation inside.
//
// The parts, one job each (each opens with its decomposition and memory
// traffic):
//   simd.h              32-byte vectors, loads/stores, Scratch, the padded
//                       image copy
//   forward.h           register tiles, ReLU + max-pool, forward_images
//   backward_lists.h    which windows pass a gradient: winner lists, masked
//                       gradients (grad_bias), window decodes
//   backward_kernels.h  grad_weight and grad_input of one channel's winners
//   backward_plan.h     the backward's path and buffers, chosen once per call
//   backward.h          backward_images, executing the plan
// Memory traffic: the forward reads the input once and writes out + indices
// once; the backward reads input, grad_out and indices once and writes
// grad_input once. Everything else (image copies, rearranged weights,
// partial sums) is per-call scratch in L1/L2.
#pragma once

#include <cstdint>

#include "backward.h"
#include "forward.h"
#include "isa.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {

// Explicit instantiations: {float, double} x {uint8 indices, int32 indices}.
#define FMNIST_INSTANTIATE(T, I)                                                  \
  template void forward_images<T, I>(const ForwardArgs<T, I>&, int64_t, int64_t); \
  template void backward_images<T, I>(const BackwardArgs<T, I>&, int64_t, int64_t);
FMNIST_INSTANTIATE(float, uint8_t)
FMNIST_INSTANTIATE(float, int32_t)
FMNIST_INSTANTIATE(double, uint8_t)
FMNIST_INSTANTIATE(double, int32_t)
#undef FMNIST_INSTANTIATE

}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
