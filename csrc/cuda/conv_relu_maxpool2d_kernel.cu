// CUDA kernels of fmnist_ext::conv_relu_maxpool2d and its backward.
//
// Designed for the small shapes of the Fashion-MNIST model (block 1:
// [N,1,28,28] conv 1->6 5x5 pool 2; block 2: [N,6,12,12] conv 6->12 5x5
// pool 2), where a whole image and the whole filter bank of a block fit in a
// few KB of shared memory and the work per image is tiny: the cost of the
// stock sequence is launches and the round trips of the un-pooled
// activation through global memory, which the fused kernels avoid.
//
// The block-level work is in kernels.cuh (__host__ __device__ phases, also
// run by the host emulation in tests/cuda_emulation); launch plans in plan.h.
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
//
// Backward, grad_weight / grad_bias (conv_relu_maxpool2d_backward_weight_kernel):
// about two blocks per SM; each loops over chunks of images: stage the padded
// images, gradients and winner offsets of the chunk; thread = (slice, weight
// or bias element) sums g * x[winner + tap offset] over the winners of its
// output channel in the chunk (a warp shares the channel, so the winner test
// is a uniform branch) into its own shared-memory partial. After the last
// chunk the slices are added up and the block issues ONE global atomicAdd
// per element (2 * SMs atomics per element in all, on zero-initialised
// outputs). Only winners are visited, as in the CPU kernels.
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
// float32 and float64 via AT_DISPATCH_FLOATING_TYPES; the kernels take the
// storage type and an accumulate type (at::acc_type), so half/bfloat16 is a
// matter of extending the dispatch macro.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "kernels.cuh"
#include "plan.h"

namespace fmnist_ext {
namespace cuda {
namespace {

// ---- kernels: thin wrappers around the phases of kernels.cuh --------------

template <typename T, typename acc_t, typename I, int P>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_forward_kernel(const FwdArgs<T, I> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t bx = blockIdx.x;
  fwd_stage(a, bx, blockIdx.y, smem, threadIdx.x, blockDim.x);
  __syncthreads();
  fwd_work<T, acc_t, I, P>(a, bx, blockIdx.y, smem, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_forward_direct_kernel(const FwdArgs<T, I> a, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    fwd_direct_item<T, acc_t, I>(a, o);
  }
}

template <typename T, typename acc_t, typename I, int CB>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_backward_input_kernel(const BwdInputArgs<T, I> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int64_t bx = blockIdx.x;
  bwd_input_stage(a, bx, smem_raw, threadIdx.x, blockDim.x);
  __syncthreads();
  bwd_input_work<T, acc_t, I, CB>(a, bx, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_backward_input_direct_kernel(const BwdInputArgs<T, I> a, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    bwd_input_direct_item<T, acc_t, I>(a, e);
  }
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_backward_weight_kernel(const BwdWeightArgs<T, I> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bwd_weight_init<T, acc_t, I>(a, smem_raw, threadIdx.x, blockDim.x);
  for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
    __syncthreads();  // previous chunk fully consumed (and partials zeroed)
    bwd_weight_stage<T, acc_t, I>(a, chunk, smem_raw, threadIdx.x, blockDim.x);
    __syncthreads();
    bwd_weight_accumulate<T, acc_t, I>(a, smem_raw, threadIdx.x, blockDim.x);
  }
  __syncthreads();
  bwd_weight_flush<T, acc_t, I>(a, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads)
conv_relu_maxpool2d_backward_weight_direct_kernel(const BwdWeightArgs<T, I> a, int64_t total) {
  for (int64_t se = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; se < total;
       se += int64_t(gridDim.x) * blockDim.x) {
    bwd_weight_direct_item<T, acc_t, I>(a, se);
  }
}

// ---- host side -----------------------------------------------------------

int num_sms(c10::DeviceIndex device) {
  // Cached per device: a plain attribute query, no stream work (capturable).
  static int cache[64] = {0};
  const int d = static_cast<int>(device);
  if (d >= 0 && d < 64 && cache[d] > 0) return cache[d];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, d));
  n = n > 0 ? n : 1;
  if (d >= 0 && d < 64) cache[d] = n;
  return n;
}

unsigned grid_x(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= INT_MAX, "conv_relu_maxpool2d: grid of ", blocks,
              " blocks is out of range");
  return static_cast<unsigned>(blocks);
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK_VALUE(t.device().is_cuda(), "conv_relu_maxpool2d: expected ", name,
                    " on a CUDA device (this is the CUDA kernel), got ", t.device());
  TORCH_CHECK_VALUE(t.device() == input.device(), "conv_relu_maxpool2d: expected ", name,
                    " on the device of input (", input.device(), "), got ", t.device());
}

void check_sizes_fit(const ConvPoolShape& s) {
  // Per-image sizes are int in the kernels; the batch is int64.
  const int64_t big = INT_MAX / 4;
  TORCH_CHECK_VALUE(s.cin * s.h * s.w < big && s.cout * s.oh * s.ow < big &&
                        s.cout * s.cin * s.kh * s.kw < big && s.pad_h < big && s.pad_w < big,
                    "conv_relu_maxpool2d: a single image or filter bank is too large for "
                    "the CUDA kernels");
}

Geom geom_of(const ConvPoolShape& s) {
  return make_geom(s.n, s.cin, s.h, s.w, s.cout, s.kh, s.kw, s.pad_h, s.pad_w, s.pool,
                   s.ph, s.pw);
}

std::tuple<at::Tensor, at::Tensor> conv_relu_maxpool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef padding, int64_t pool) {
  const ConvPoolShape s = check_conv_relu_maxpool2d_args(input, weight, bias, padding, pool);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cuda(*bias, "bias", input);
  check_sizes_fit(s);

  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out = at::empty({s.n, s.cout, s.ph, s.pw}, input.options());
  at::Tensor indices = at::empty({s.n, s.cout, s.ph, s.pw},
                                 input.options().dtype(index_dtype_for_pool(pool)));
  if (out.numel() == 0) return {out, indices};

  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const Geom g = geom_of(s);
  const int sms = num_sms(input.device().index());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_forward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      const FwdPlan plan = plan_forward(g, sizeof(scalar_t), sms);
      FwdArgs<scalar_t, I> a{g,
                             x.const_data_ptr<scalar_t>(),
                             w.const_data_ptr<scalar_t>(),
                             has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
                             out.mutable_data_ptr<scalar_t>(),
                             static_cast<I*>(indices.mutable_data_ptr()),
                             plan.imgs,
                             plan.cgp};
      if (plan.fast) {
        TORCH_CHECK(plan.groups <= 65535, "conv_relu_maxpool2d: too many output channels (",
                    s.cout, ") for the CUDA kernel grid");
        const dim3 grid(grid_x(plan.blocks), static_cast<unsigned>(plan.groups));
        bool launched = false;
        if constexpr (std::is_same_v<I, uint8_t>) {  // pool 2 always has uint8 indices
          if (pool == 2) {
            conv_relu_maxpool2d_forward_kernel<scalar_t, acc_t, I, 2>
                <<<grid, plan.threads, plan.smem, stream>>>(a);
            launched = true;
          }
        }
        if (!launched) {
          conv_relu_maxpool2d_forward_kernel<scalar_t, acc_t, I, 0>
              <<<grid, plan.threads, plan.smem, stream>>>(a);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        conv_relu_maxpool2d_forward_direct_kernel<scalar_t, acc_t, I>
            <<<grid_x(plan.blocks), plan.threads, 0, stream>>>(a, out.numel());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {out, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_maxpool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& indices, c10::IntArrayRef padding, int64_t pool,
    std::array<bool, 3> output_mask) {
  const ConvPoolShape s =
      check_conv_relu_maxpool2d_args(input, weight, std::nullopt, padding, pool);
  check_backward_args(grad_output, indices, s, input);
  check_cuda(input, "input", input);
  check_cuda(weight, "weight", input);
  check_cuda(grad_output, "grad_output", input);
  check_cuda(indices, "indices", input);
  check_sizes_fit(s);

  const c10::cuda::CUDAGuard guard(input.device());
  const auto opts = input.options();
  at::Tensor grad_input = output_mask[0] ? at::empty({s.n, s.cin, s.h, s.w}, opts)
                                         : at::empty({0}, opts);
  at::Tensor grad_weight = output_mask[1]
                               ? at::zeros_like(weight, at::MemoryFormat::Contiguous)
                               : at::empty({0}, opts);
  at::Tensor grad_bias = output_mask[2] ? at::zeros({s.cout}, opts) : at::empty({0}, opts);
  if (s.n == 0 || !(output_mask[0] || output_mask[1] || output_mask[2])) {
    return {grad_input, grad_weight, grad_bias};
  }

  const at::Tensor go = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor w = weight.contiguous();
  const at::Tensor x = output_mask[1] ? input.contiguous() : at::Tensor();
  const Geom g = geom_of(s);
  const int sms = num_sms(input.device().index());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_backward_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      const I* idx_p = static_cast<const I*>(idx.const_data_ptr());
      if (output_mask[0] && grad_input.numel() > 0 && s.cout == 0) {
        grad_input.zero_();  // no output channel: nothing flows back
      } else if (output_mask[0] && grad_input.numel() > 0) {
        const BwdInputPlan plan = plan_backward_input(g, sizeof(scalar_t), sms);
        BwdInputArgs<scalar_t, I> a{g,
                                    w.const_data_ptr<scalar_t>(),
                                    go.const_data_ptr<scalar_t>(),
                                    idx_p,
                                    grad_input.mutable_data_ptr<scalar_t>(),
                                    plan.imgs,
                                    plan.cinp};
        if (plan.fast) {
          if (plan.cb == 1) {
            conv_relu_maxpool2d_backward_input_kernel<scalar_t, acc_t, I, 1>
                <<<grid_x(plan.blocks), plan.threads, plan.smem, stream>>>(a);
          } else {
            conv_relu_maxpool2d_backward_input_kernel<scalar_t, acc_t, I, kCib>
                <<<grid_x(plan.blocks), plan.threads, plan.smem, stream>>>(a);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          conv_relu_maxpool2d_backward_input_direct_kernel<scalar_t, acc_t, I>
              <<<grid_x(plan.blocks), plan.threads, 0, stream>>>(a, grad_input.numel());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
      if ((output_mask[1] || output_mask[2]) && bwd_weight_elems(g) > 0) {
        const BwdWeightPlan plan =
            plan_backward_weight(g, sizeof(scalar_t), sizeof(acc_t), sms);
        BwdWeightArgs<scalar_t, I> a{g,
                                     output_mask[1] ? x.const_data_ptr<scalar_t>() : nullptr,
                                     go.const_data_ptr<scalar_t>(),
                                     idx_p,
                                     output_mask[1] ? grad_weight.mutable_data_ptr<scalar_t>() : nullptr,
                                     output_mask[2] ? grad_bias.mutable_data_ptr<scalar_t>() : nullptr,
                                     plan.imgs,
                                     plan.slices,
                                     plan.chunks};
        if (plan.fast) {
          conv_relu_maxpool2d_backward_weight_kernel<scalar_t, acc_t, I>
              <<<grid_x(plan.blocks), plan.threads, plan.smem, stream>>>(a);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          const int64_t total = int64_t(bwd_weight_elems(g)) * plan.slices;
          conv_relu_maxpool2d_backward_weight_direct_kernel<scalar_t, acc_t, I>
              <<<grid_x(plan.blocks), plan.threads, 0, stream>>>(a, total);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      }
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cuda
}  // namespace fmnist_ext

TORCH_LIBRARY_IMPL(fmnist_ext, CUDA, m) {
  m.impl("conv_relu_maxpool2d", &fmnist_ext::cuda::conv_relu_maxpool2d_forward_cuda);
  m.impl("_conv_relu_maxpool2d_backward", &fmnist_ext::cuda::conv_relu_maxpool2d_backward_cuda);
}
