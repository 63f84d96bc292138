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
// very kernels on CPU threads), this file (checks, dtype dispatch, the
// device guard and the stream, all on the LibTorch stable ABI: ../stable_api.h). The call's sizes
// travel as the ConvPoolGeometry the checks fill (../geometry.h), narrowed once to int for the
// kernels (kernel_geometry in kernels.cuh).
//
// Forward, tiled path (conv_relu_maxpool2d_forward_tiled_kernel; 5-wide
// filters, pool 2, pooled width a multiple of 4: both seed blocks):
//   grid.x = tiles of 8 images, every output channel in the block. Stage the
//   filter bank as [tap][group of 3 channels][4], the bias and the 8 zero-
//   padded images (image stride chosen so the 8 images start 16 bytes apart
//   modulo the banks). Thread = (3 channels, pooled row, 4 pooled columns,
//   image), image fastest: 48 convolution outputs in registers; per staged
//   input row one conflict-free 12-word row load (3 x 16 bytes) and per
//   filter tap one 16-byte weight broadcast feed 24 FMAs, so the kernel is
//   bound by the FP32 FMA rate, not by shared memory (kernels_forward.cuh).
//   Same traffic as below: input read once, out + indices written once.
//
// Forward (conv_relu_maxpool2d_forward_kernel), fast path for other shapes:
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
// Pool 2 with 5 x 5 filters over 4 pooled columns (block 2) runs instead
// conv_relu_maxpool2d_backward_input_patch_kernel: each pool cell adds its
// g times the filter shifted to its winner over its 6 x 6 input patch (the
// 4 shifted copies staged per block, picked by address), into register
// tiles of 6 x 12 input values per (image, row band); grid (32-image tiles,
// input channels); kernels_backward_input.cuh, bwd_patch_*.
//
// Backward, grad_weight / grad_bias (conv_relu_maxpool2d_backward_weight_kernel):
// about two blocks per SM; each loops over chunks of images: stage the padded
// images, gradients and winner offsets of the chunk; thread = (slice, weight
// or bias element) sums g * x[winner + tap offset] over the winners of its
// output channel in the chunk (a warp shares the channel, so the winner test
// is a uniform branch) into its own shared-memory partial. After the last
// chunk the slices are added up and the block writes its row of partial
// sums; a second small kernel adds the rows (one per block) in a fixed tree
// (reduce_partials_*). Only winners are visited, as in the CPU kernels.
// Filters 5 wide with the model's channel counts and widths (both blocks)
// run instead conv_relu_maxpool2d_backward_weight_dense_kernel: per-thread
// register accumulators over a dense product of the staged images and
// gradients, in a persistent grid (kernels.cuh, wdense_*), then the same
// reduction.
//
// Shapes whose tiles do not fit the 48 KB shared-memory budget run direct
// kernels (one thread per output / input element / weight element x batch
// slice, reading global memory): correct for any size, not tuned.
//
// All launches go to the current stream (torch's, through the stable C shim)
// under a device guard (torch::stable::accelerator::DeviceGuard), each
// followed by a cudaGetLastError check; the op never synchronises with the host
// and allocates only through the caching allocator, so it can be captured in
// a CUDA graph. Global offsets are int64 (a batch of 60,000 images is one
// call). Input, grad_output and indices are made contiguous (a channels_last
// or sliced input is copied once); the outputs are contiguous NCHW.
// grad_weight / grad_bias are reduced without atomics, in a fixed order
// (kernels.cuh), so the backward repeats bitwise on the same GPU.
// float32 and float64 via dispatch_floating; the kernels take the storage
// type and an accumulate type (AccType below, at::acc_type's choice for
// these two), so half/bfloat16 is a matter of extending the dispatch.
#ifndef USE_CUDA
#define USE_CUDA  // declares the CUDA part of torch's C shim (the current stream)
#endif
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include <array>
#include <climits>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../stable_api.h"
#include "op_body.h"
#include "sm_count.h"

namespace fmnist_ext {
namespace cuda {
namespace {

// at::acc_type<T, /*is_cuda=*/true> for the dtypes the op takes.
template <typename T>
struct AccType {
  using type = T;  // float -> float, double -> double
};

void cuda_check(cudaError_t err, const char* what) {
  FMNIST_CHECK(err == cudaSuccess, "conv_relu_maxpool2d: ", what, ": CUDA error ",
               static_cast<int>(err), " (", cudaGetErrorName(err), "): ", cudaGetErrorString(err));
}

int num_sms(int device) {
  // A plain attribute query, no stream work (capturable); cached per device.
  return cached_sm_count(device, [](int d) {
    int n = 0;
    cuda_check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d),
               "cudaDeviceGetAttribute");
    return n;
  });
}

// op_body.h's backend on stable tensors: torch's caching allocator (new
// tensors on the input's device) and the current stream of that device.
struct StableBackend {
  using Tensor = fmnist_ext::Tensor;
  Tensor like;  // the input: device of every new tensor
  cudaStream_t stream;
  int device;

  template <typename E>
  Tensor empty(std::vector<int64_t> sizes) const {
    return empty_on(like, sizes, scalar_type_of<E>());
  }
  template <typename E>
  Tensor zeros(std::vector<int64_t> sizes) const {
    return zeros_on(like, sizes, scalar_type_of<E>());
  }
  Tensor contiguous(const Tensor& t) const { return fmnist_ext::contiguous(t); }
  template <typename E>
  E* ptr(const Tensor& t) const {
    return static_cast<E*>(t.data_ptr());
  }
  int64_t numel(const Tensor& t) const { return t.numel(); }
  int num_sms() const { return cuda::num_sms(device); }
  void check(bool ok, const char* message) const { FMNIST_CHECK(ok, message); }
  template <typename... P, typename... A>
  void launch(void (*kernel)(P...), dim3 grid, int threads, size_t smem, const A&... args) const {
    kernel<<<grid, threads, smem, stream>>>(args...);
    cuda_check(cudaGetLastError(), "kernel launch");
  }
};

void check_cuda(const Tensor& t, const char* name, const Tensor& input) {
  FMNIST_CHECK_VALUE(t.is_cuda(), "conv_relu_maxpool2d: expected ", name,
                     " on a CUDA device (this is the CUDA kernel), got ", device_of(t));
  FMNIST_CHECK_VALUE(same_device(t, input), "conv_relu_maxpool2d: expected ", name,
                     " on the device of input (", device_of(input), "), got ", device_of(t));
}

void check_sizes_fit(const ConvPoolGeometry& g) {
  // Per-image sizes are int in the kernels (kernel_geometry in kernels.cuh);
  // the batch is int64.
  const int64_t big = INT_MAX / 4;
  FMNIST_CHECK_VALUE(g.cin * g.h * g.w < big && g.cout * g.oh * g.ow < big &&
                         g.cout * g.cin * g.kh * g.kw < big && g.pad_h < big && g.pad_w < big,
                     "conv_relu_maxpool2d: a single image or filter bank is too large for "
                     "the CUDA kernels");
}

// Call under the device guard: the current stream of input's device.
StableBackend backend_for(const Tensor& input) {
  const int device = input.get_device_index();
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device, &stream));
  return StableBackend{input, static_cast<cudaStream_t>(stream), device};
}

std::tuple<Tensor, Tensor> conv_relu_maxpool2d_forward_cuda(const Tensor& input,
                                                            const Tensor& weight,
                                                            const std::optional<Tensor>& bias,
                                                            std::vector<int64_t> padding,
                                                            int64_t pool) {
  const ConvPoolGeometry g = check_conv_relu_maxpool2d_args(input, weight, bias, padding, pool);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cuda(*bias, "bias", input);
  check_sizes_fit(g);

  const torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  StableBackend be = backend_for(input);
  std::tuple<Tensor, Tensor> result;
  dispatch_floating(input.scalar_type(), "conv_relu_maxpool2d", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = typename AccType<scalar_t>::type;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      result = forward_op<scalar_t, acc_t, I>(be, g, input, weight, has_bias ? &*bias : nullptr);
    });
  });
  return result;
}

std::tuple<Tensor, Tensor, Tensor> conv_relu_maxpool2d_backward_cuda(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& indices,
    std::vector<int64_t> padding, int64_t pool, std::vector<bool> output_mask) {
  const ConvPoolGeometry g =
      check_conv_relu_maxpool2d_args(input, weight, std::nullopt, padding, pool);
  check_backward_args(grad_output, indices, g, input);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  check_cuda(grad_output, "grad_output", input);
  check_cuda(indices, "indices", input);
  check_sizes_fit(g);
  FMNIST_CHECK_VALUE(output_mask.size() == 3, "_conv_relu_maxpool2d_backward",
                     ": expected output_mask of 3 elements, got ", output_mask.size());
  const std::array<bool, 3> mask{output_mask[0], output_mask[1], output_mask[2]};

  const torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  StableBackend be = backend_for(input);
  std::tuple<Tensor, Tensor, Tensor> result;
  dispatch_floating(input.scalar_type(), "_conv_relu_maxpool2d_backward", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    using acc_t = typename AccType<scalar_t>::type;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      result = backward_op<scalar_t, acc_t, I>(be, g, grad_output, input, weight, indices, mask);
    });
  });
  return result;
}

}  // namespace
}  // namespace cuda
}  // namespace fmnist_ext

STABLE_TORCH_LIBRARY_IMPL(fmnist_ext, CUDA, m) {
  m.impl("conv_relu_maxpool2d", TORCH_BOX(&fmnist_ext::cuda::conv_relu_maxpool2d_forward_cuda));
  m.impl("_conv_relu_maxpool2d_backward",
         TORCH_BOX(&fmnist_ext::cuda::conv_relu_maxpool2d_backward_cuda));
}
