// CUDA kernels of fmnist_ext::conv_relu_maxpool2d and its backward.
//
// Designed for the small shapes of the Fashion-MNIST model (block 1:
// [N,1,28,28] conv 1->6 5x5 pool 2; block 2: [N,6,12,12] conv 6->12 5x5
// pool 2), where a whole image and the whole filter bank of a block fit in a
// few KB of shared memory and the work per image is tiny: the cost of the
// stock sequence is launches and the round trips of the un-pooled
// activation through global memory, which the fused kernels avoid.
//
// Where the code is: kernels.cuh (the __host__ __device__ phases of a block),
// kernels_global.cuh (the __global__ kernels), plan.h (launch plans),
// op_body.h (allocation, output_mask, contiguity, kernel variant and launch;
// shared with the execution harness in tests/cuda_emulation, which runs these
// very kernels on CPU threads), this file (ATen checks, dtype dispatch, the
// device guard and the stream). The call's sizes travel as the
// ConvPoolGeometry the checks fill (../geometry.h), narrowed once to int for
// the kernels (kernel_geometry in kernels.cuh).
//
// Forward (conv_relu_maxpool2d_forward_kernel), fast path:
//   grid.x = tiles of `imgs` images, grid.y = groups of output channels whose
//   weights fit in shared memory (one group for both seed blocks).
//   1. stage: the group's filter bank, transposed to [tap][channel] so the 4
//      weights of a tap are one 16-byte broadcast load, the bias, and the
//      zero-padded images of the tile (only the rows/columns the pooled
//      outputs need); coalesced global reads, each input read once per
//      channel group.
//   2. work: thread = (image, 4 output channels, pooled cell), cells fastest:
//      it accumulates the pool*pool convolution outputs of its window for its
//      4 channels in registers (pool == 2 is compiled with the window
//      unrolled: 16 accumulators, each weight load feeds 4 pixels and each
//      pixel load 4 channels), runs the max-pool scan and ReLU of
//      index_math.h and writes the pooled value and the compact winner index
//      (uint8 for pool <= 15): coalesced stores, the un-pooled convolution
//      never leaves registers.
//   Memory traffic: read input once, weights once per block (L2-resident),
//   write out + indices once (1/pool^2 of the convolution, +25% for uint8).
//   Threads per block and images per block come from plan_forward: about 256
//   threads of useful work, at least one block per SM where the batch allows.
//
// Backward, grad_input (conv_relu_maxpool2d_backward_input_kernel): gather,
// no atomics. Block = tile of images; stage the filter bank as
// [co][kh][kw][ci], the gradients and the winners of the tile's pool cells
// (packed conv row/col, -1 for "no gradient"). Thread = (image, 4 input
// channels, input pixel): for every output channel it visits the <= 3x3 pool
// cells whose windows can read the pixel (first/last_cell_reaching in
// index_math.h) and adds g * w for each winner that does. Every element of
// grad_input is written exactly once, coalesced; nothing is zeroed first.
// Filters 5 wide over 8 pooled columns (block 2) run instead
// conv_relu_maxpool2d_backward_input_dense_kernel: a dense masked transposed
// convolution, each thread a register tile of input rows, in a persistent
// grid that stages the filters once per block (kernels.cuh, bwd_dense_*).
//
// Backward, grad_weight / grad_bias (conv_relu_maxpool2d_backward_weight_kernel):
// about two blocks per SM; each loops over chunks of images: stage the padded
// images, gradients and winner offsets of the chunk; thread = (slice, weight
// or bias element) sums g * x[winner + tap offset] over the winners of its
// output channel in the chunk (a warp shares the channel, so the winner test
// is a uniform branch) into its own shared-memory partial. After the last
// chunk the slices are added up and the block writes its row of partial
// sums; a second small kernel adds the rows (about 2 * SMs) in row order.
// Only winners are visited, as in the CPU kernels. Filters 5 wide with 12
// output channels (block 2) run instead
// conv_relu_maxpool2d_backward_weight_dense_kernel: per-thread register
// accumulators over a dense product of the staged images and gradients, in a
// persistent grid (kernels.cuh, wdense_*), then the same reduction.
//
// Shapes whose tiles do not fit the 48 KB shared-memory budget run direct
// kernels (one thread per output / input element / weight element x batch
// slice, reading global memory): correct for any size, not tuned.
//
// All launches go to the current stream under a device guard, each followed
// by C10_CUDA_KERNEL_LAUNCH_CHECK(); the op never synchronises with the host
// and allocates only through the caching allocator, so it can be captured in
// a CUDA graph. Global offsets are int64 (a batch of 60,000 images is one
// call). Input, grad_output and indices are made contiguous (a channels_last
// or sliced input is copied once); the outputs are contiguous NCHW.
// grad_weight / grad_bias are reduced without atomics, in a fixed order
// (kernels.cuh), so the backward repeats bitwise on the same GPU.
// float32 and float64 via AT_DISPATCH_FLOATING_TYPES; the kernels take the
// storage type and an accumulate type (at::acc_type), so half/bfloat16 is a
// matter of extending the dispatch macro.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "op_body.h"
#include "sm_count.h"

namespace fmnist_ext {
namespace cuda {
namespace {

int num_sms(c10::DeviceIndex device) {
  // A plain attribute query, no stream work (capturable); cached per device.
  return cached_sm_count(static_cast<int>(device), [](int d) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
    return n;
  });
}

// op_body.h's backend on ATen tensors: the caching allocator and the
// current stream of the input's device.
struct AtenBackend {
  using Tensor = at::Tensor;
  at::TensorOptions opts;
  cudaStream_t stream;
  c10::DeviceIndex device;

  template <typename E>
  Tensor empty(std::vector<int64_t> sizes) const {
    return at::empty(sizes, opts.dtype(c10::CppTypeToScalarType<E>::value));
  }
  template <typename E>
  Tensor zeros(std::vector<int64_t> sizes) const {
    return at::zeros(sizes, opts.dtype(c10::CppTypeToScalarType<E>::value));
  }
  Tensor contiguous(const Tensor& t) const { return t.contiguous(); }
  template <typename E>
  E* ptr(const Tensor& t) const {
    return static_cast<E*>(t.data_ptr());
  }
  int64_t numel(const Tensor& t) const { return t.numel(); }
  int num_sms() const { return cuda::num_sms(device); }
  void check(bool ok, const char* message) const { TORCH_CHECK(ok, message); }
  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), dim3 grid, int threads, size_t smem, const A&... args) const {
    kernel<<<grid, threads, smem, stream>>>(args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.device().is_cuda(), "conv_relu_maxpool2d: expected ", name,
                    " on a CUDA device (this is the CUDA kernel), got ", t.device());
  TORCH_CHECK_VALUE(t.device() == input.device(), "conv_relu_maxpool2d: expected ", name,
                    " on the device of input (", input.device(), "), got ", t.device());
}

void check_sizes_fit(const ConvPoolGeometry& g) {
  // Per-image sizes are int in the kernels (kernel_geometry in kernels.cuh);
  // the batch is int64.
  const int64_t big = INT_MAX / 4;
  TORCH_CHECK_VALUE(g.cin * g.h * g.w < big && g.cout * g.oh * g.ow < big &&
                        g.cout * g.cin * g.kh * g.kw < big && g.pad_h < big && g.pad_w < big,
                    "conv_relu_maxpool2d: a single image or filter bank is too large for "
                    "the CUDA kernels");
}

AtenBackend backend_for(const at::Tensor& input) {
  return AtenBackend{input.options(), c10::cuda::getCurrentCUDAStream(), input.device().index()};
}

std::tuple<at::Tensor, at::Tensor> conv_relu_maxpool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef padding, int64_t pool) {
  const ConvPoolGeometry g = check_conv_relu_maxpool2d_args(input, weight, bias, padding, pool);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cuda(*bias, "bias", input);
  check_sizes_fit(g);

  const c10::cuda::CUDAGuard guard(input.device());
  AtenBackend be = backend_for(input);
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      result = forward_op<scalar_t, acc_t, I>(be, g, input, weight, has_bias ? &*bias : nullptr);
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& indices, c10::IntArrayRef padding, int64_t pool,
    std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g =
      check_conv_relu_maxpool2d_args(input, weight, std::nullopt, padding, pool);
  check_backward_args(grad_output, indices, g, input);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  check_cuda(grad_output, "grad_output", input);
  check_cuda(indices, "indices", input);
  check_sizes_fit(g);

  const c10::cuda::CUDAGuard guard(input.device());
  AtenBackend be = backend_for(input);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      result =
          backward_op<scalar_t, acc_t, I>(be, g, grad_output, input, weight, indices, output_mask);
    });
  });
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace fmnist_ext

TORCH_LIBRARY_IMPL(fmnist_ext, CUDA, m) {
  m.impl("conv_relu_maxpool2d", &fmnist_ext::cuda::conv_relu_maxpool2d_forward_cuda);
  m.impl("_conv_relu_maxpool2d_backward", &fmnist_ext::cuda::conv_relu_maxpool2d_backward_cuda);
}
