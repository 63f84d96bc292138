// The host side of the CUDA operator, written once for the real op
// (conv_relu_maxpool2d_kernel.cu, on ATen tensors and the CUDA stream) and the
// execution harness (tests/cuda_emulation/harness.cpp, on host buffers and
// threads): which outputs are allocated and which must be zeros, what
// output_mask leaves out, which inputs are made contiguous, which kernel
// variant runs with which launch plan (plan.h).
//
// B, the backend, provides:
//   using Tensor;                                   default-constructible
//   template <class E> Tensor empty(std::vector<int64_t> sizes);
//   template <class E> Tensor zeros(std::vector<int64_t> sizes);
//   Tensor contiguous(const Tensor&);               NCHW-contiguous view or copy
//   template <class E> E* ptr(const Tensor&);
//   int64_t numel(const Tensor&);
//   int num_sms();                                  the device's SM count
//   void check(bool ok, const char* message);      raise when !ok
//   void launch(kernel, dim3 grid, int threads, size_t smem_bytes, args...);
#pragma once

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels_global.cuh"
#include "plan.h"
#include "sm_count.h"

namespace fmnist_ext {
namespace cuda {

template <typename B>
unsigned grid_x(B& be, int64_t blocks) {
  be.check(blocks >= 1 && blocks <= INT_MAX, "conv_relu_maxpool2d: CUDA grid size out of range");
  return static_cast<unsigned>(blocks);
}

// The SM count the launch plans use: the device's, or FMNIST_CUDA_SM_COUNT's.
template <typename B>
int plan_sm_count(B& be) {
  const int n = sm_count_override();
  be.check(n >= 0, "conv_relu_maxpool2d: FMNIST_CUDA_SM_COUNT must be an integer in [1, 65536]");
  return n > 0 ? n : be.num_sms();
}

template <typename T, typename acc_t, typename I, typename B>
std::tuple<typename B::Tensor, typename B::Tensor> forward_op(B& be,
                                                              const ConvPoolGeometry& geometry,
                                                              const typename B::Tensor& input,
                                                              const typename B::Tensor& weight,
                                                              const typename B::Tensor* bias) {
  using Tensor = typename B::Tensor;
  const KernelGeometry g = kernel_geometry(geometry);
  // Every element of out and indices is written by the kernel.
  Tensor out = be.template empty<T>({g.n, g.cout, g.ph, g.pw});
  Tensor indices = be.template empty<I>({g.n, g.cout, g.ph, g.pw});
  if (be.numel(out) == 0) return {out, indices};
  // The kernels index contiguous NCHW memory: a channels_last or sliced
  // tensor is copied once (a contiguous one is used as it is).
  const Tensor x = be.contiguous(input);
  const Tensor w = be.contiguous(weight);
  const Tensor b = bias != nullptr ? be.contiguous(*bias) : Tensor();
  const FwdPlan plan = plan_forward(g, sizeof(T), plan_sm_count(be));
  const FwdArgs<T, I> a{g,
                        be.template ptr<T>(x),
                        be.template ptr<T>(w),
                        bias != nullptr ? be.template ptr<T>(b) : nullptr,
                        be.template ptr<T>(out),
                        be.template ptr<I>(indices),
                        plan.imgs,
                        plan.cgp,
                        plan.xcols,
                        plan.ximg};
  if (!plan.fast) {
    be.launch(&conv_relu_maxpool2d_forward_direct_kernel<T, acc_t, I>,
              dim3(grid_x(be, plan.blocks)), plan.threads, 0, a, be.numel(out));
    return {out, indices};
  }
  if (plan.tiled) {
    be.launch(&conv_relu_maxpool2d_forward_tiled_kernel<T, acc_t, I>, dim3(grid_x(be, plan.blocks)),
              plan.threads, plan.smem, a);
    return {out, indices};
  }
  be.check(plan.groups <= 65535,
           "conv_relu_maxpool2d: too many output channels for the CUDA kernel grid");
  const dim3 grid(grid_x(be, plan.blocks), static_cast<unsigned>(plan.groups));
  // Pool 2 (whose indices are always uint8) runs the kernel with the window
  // unrolled at compile time.
  if constexpr (std::is_same_v<I, uint8_t>) {
    if (g.pool == 2) {
      be.launch(&conv_relu_maxpool2d_forward_kernel<T, acc_t, I, 2>, grid, plan.threads, plan.smem,
                a);
      return {out, indices};
    }
  }
  be.launch(&conv_relu_maxpool2d_forward_kernel<T, acc_t, I, 0>, grid, plan.threads, plan.smem, a);
  return {out, indices};
}

template <typename T, typename acc_t, typename I, typename B>
std::tuple<typename B::Tensor, typename B::Tensor, typename B::Tensor> backward_op(
    B& be, const ConvPoolGeometry& geometry, const typename B::Tensor& grad_output,
    const typename B::Tensor& input, const typename B::Tensor& weight,
    const typename B::Tensor& indices, std::array<bool, 3> output_mask) {
  using Tensor = typename B::Tensor;
  const KernelGeometry g = kernel_geometry(geometry);
  // The kernels write every element of each requested gradient, so those
  // are allocated uninitialised; with no image or no output channel the sums
  // are empty and nothing is launched: zeros. Unrequested gradients are
  // empty tensors, as the schema's output_mask contract says.
  const bool empty_sum = g.n == 0 || g.cout == 0;
  auto grad = [&](bool wanted, std::vector<int64_t> sizes) {
    if (!wanted) return be.template empty<T>({0});
    return empty_sum ? be.template zeros<T>(sizes) : be.template empty<T>(sizes);
  };
  Tensor grad_input = grad(output_mask[0], {g.n, g.cin, g.h, g.w});
  Tensor grad_weight = grad(output_mask[1], {g.cout, g.cin, g.kh, g.kw});
  Tensor grad_bias = grad(output_mask[2], {g.cout});
  if (empty_sum || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    return {grad_input, grad_weight, grad_bias};
  }
  const Tensor go = be.contiguous(grad_output);
  const Tensor idx = be.contiguous(indices);
  const int sms = plan_sm_count(be);

  if (output_mask[0] && be.numel(grad_input) > 0) {
    const Tensor w = be.contiguous(weight);
    const BwdInputPlan plan = plan_backward_input(g, sizeof(T), sms);
    const BwdInputArgs<T, I> a{g,
                               be.template ptr<T>(w),
                               be.template ptr<T>(go),
                               be.template ptr<I>(idx),
                               be.template ptr<T>(grad_input),
                               plan.imgs,
                               plan.cinp,
                               plan.gstride,
                               plan.vstride};
    const dim3 grid(grid_x(be, plan.blocks));
    if (plan.patch) {
      be.launch(&conv_relu_maxpool2d_backward_input_patch_kernel<T, acc_t, I>,
                dim3(grid_x(be, plan.blocks), static_cast<unsigned>(g.cin)), plan.threads,
                plan.smem, a);
    } else if (!plan.fast) {
      be.launch(&conv_relu_maxpool2d_backward_input_direct_kernel<T, acc_t, I>, grid, plan.threads,
                0, a, be.numel(grad_input));
    } else if (plan.cb == 1) {
      be.launch(&conv_relu_maxpool2d_backward_input_kernel<T, acc_t, I, 1>, grid, plan.threads,
                plan.smem, a);
    } else {
      be.launch(&conv_relu_maxpool2d_backward_input_kernel<T, acc_t, I, kCib>, grid, plan.threads,
                plan.smem, a);
    }
  }

  if (output_mask[1] || output_mask[2]) {
    // The input is read (and copied if need be) only for grad_weight.
    const Tensor x = output_mask[1] ? be.contiguous(input) : Tensor();
    const BwdWeightPlan plan = plan_backward_weight(g, sizeof(T), sizeof(acc_t), sms);
    const int ne = bwd_weight_elems(g);
    // One row of partial sums per block (fast path) or per batch slice
    // (direct path); every row is written in full before it is reduced.
    const int64_t rows = plan.fast ? plan.blocks : plan.slices;
    Tensor partials = be.template empty<acc_t>({rows * ne});
    const BwdWeightArgs<T, acc_t, I> a{g,
                                       output_mask[1] ? be.template ptr<T>(x) : nullptr,
                                       be.template ptr<T>(go),
                                       be.template ptr<I>(idx),
                                       output_mask[1] ? be.template ptr<T>(grad_weight) : nullptr,
                                       output_mask[2] ? be.template ptr<T>(grad_bias) : nullptr,
                                       be.template ptr<acc_t>(partials),
                                       plan.imgs,
                                       plan.slices,
                                       plan.chunks,
                                       plan.xcols,
                                       plan.xplane,
                                       plan.dband};
    if (plan.dense) {
      // The instantiation for the plan's shape (kWDenseShapes).
      const dim3 wgrid(grid_x(be, plan.blocks));
      const auto dense = [&](auto kernel) { be.launch(kernel, wgrid, plan.threads, plan.smem, a); };
      constexpr WDenseShape s0 = kWDenseShapes[0], s1 = kWDenseShapes[1];
      if (plan.shape == 0) {
        dense(&conv_relu_maxpool2d_backward_weight_dense_kernel<T, acc_t, I, s0.c, s0.gw>);
      } else {
        dense(&conv_relu_maxpool2d_backward_weight_dense_kernel<T, acc_t, I, s1.c, s1.gw>);
      }
    } else if (plan.fast) {
      be.launch(&conv_relu_maxpool2d_backward_weight_kernel<T, acc_t, I>,
                dim3(grid_x(be, plan.blocks)), plan.threads, plan.smem, a);
    } else {
      be.launch(&conv_relu_maxpool2d_backward_weight_direct_kernel<T, acc_t, I>,
                dim3(grid_x(be, plan.blocks)), plan.threads, 0, a, int64_t(ne) * plan.slices);
    }
    be.launch(&conv_relu_maxpool2d_reduce_partials_kernel<T, acc_t, I>,
              dim3(grid_x(be, std::min<int64_t>(ceil_div(ne, kReduceElems),
                                                int64_t(sms) * kReduceBlocksPerSm))),
              kMaxThreads, reduce_partials_smem_bytes(sizeof(acc_t)), a, rows);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cuda
}  // namespace fmnist_ext
