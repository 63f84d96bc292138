// The __global__ kernels of conv_relu_maxpool2d: thin wrappers that run the
// phases of kernels.cuh with __syncthreads() between them.
//
// This header is the ONLY definition of the kernels. nvcc compiles it for the
// GPU (conv_relu_maxpool2d_kernel.cu, through op_body.h); the execution
// harness (tests/cuda_emulation) compiles the very same text with a host C++
// compiler after tests/cuda_emulation/shim.h, which supplies threadIdx,
// blockIdx, blockDim, gridDim, __syncthreads() (a real barrier across real
// threads) and FMNIST_DYNAMIC_SMEM (an exact-size heap buffer per block).
// Kernels use no static __shared__ memory, atomics or warp intrinsics.
#pragma once

#include "kernels.cuh"

#if defined(__CUDACC__)
#define FMNIST_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#elif !defined(FMNIST_DYNAMIC_SMEM)
#error "kernels_global.cuh needs nvcc or tests/cuda_emulation/shim.h"
#endif

namespace fmnist_ext {
namespace cuda {

template <typename T, typename acc_t, typename I, int P>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_forward_kernel(
    const FwdArgs<T, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  const int64_t bx = blockIdx.x;
  fwd_stage(a, bx, blockIdx.y, smem, threadIdx.x, blockDim.x);
  __syncthreads();  // staged weights and images, read by every thread below
  fwd_work<T, acc_t, I, P>(a, bx, blockIdx.y, smem, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_forward_tiled_kernel(
    const FwdArgs<T, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  T* smem = reinterpret_cast<T*>(smem_raw);
  fwd_tiled_stage(a, blockIdx.x, smem, threadIdx.x, blockDim.x);
  __syncthreads();  // staged weights and images, read by every thread below
  fwd_tiled_work<T, acc_t, I>(a, blockIdx.x, smem, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_forward_direct_kernel(
    const FwdArgs<T, I> a, int64_t total) {
  for (int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; o < total;
       o += int64_t(gridDim.x) * blockDim.x) {
    fwd_direct_item<T, acc_t, I>(a, o);
  }
}

template <typename T, typename acc_t, typename I, int CB>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_input_kernel(
    const BwdInputArgs<T, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  const int64_t bx = blockIdx.x;
  bwd_input_stage(a, bx, smem_raw, threadIdx.x, blockDim.x);
  __syncthreads();  // staged weights, gradients and winners
  bwd_input_work<T, acc_t, I, CB>(a, bx, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_input_patch_kernel(
    const BwdInputArgs<T, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  bwd_patch_stage(a, blockIdx.x, blockIdx.y, smem_raw, threadIdx.x, blockDim.x);
  __syncthreads();  // the shifted filters, gradients and winners staged
  bwd_patch_work<T, acc_t, I>(a, blockIdx.x, blockIdx.y, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_input_direct_kernel(
    const BwdInputArgs<T, I> a, int64_t total) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    bwd_input_direct_item<T, acc_t, I>(a, e);
  }
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_weight_kernel(
    const BwdWeightArgs<T, acc_t, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  bwd_weight_init<T, acc_t, I>(a, smem_raw, threadIdx.x, blockDim.x);
  for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
    __syncthreads();  // previous chunk fully consumed (and partials zeroed)
    bwd_weight_stage<T, acc_t, I>(a, chunk, smem_raw, threadIdx.x, blockDim.x);
    __syncthreads();  // chunk staged
    bwd_weight_accumulate<T, acc_t, I>(a, smem_raw, threadIdx.x, blockDim.x);
  }
  __syncthreads();  // every slice's partial complete
  bwd_weight_flush<T, acc_t, I>(a, blockIdx.x, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I, int C, int GW>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_weight_dense_kernel(
    const BwdWeightArgs<T, acc_t, I> a) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  const WDenseLane lane = wdense_lane(a.g, threadIdx.x);
  WDenseAcc<acc_t, C> acc;
  wdense_zero(acc);
  for (int64_t chunk = blockIdx.x; chunk < a.chunks; chunk += gridDim.x) {
    __syncthreads();  // the previous chunk consumed
    wdense_stage<T, acc_t, I, C, GW>(a, chunk, smem_raw, threadIdx.x, blockDim.x);
    __syncthreads();  // chunk staged
    wdense_accumulate<T, acc_t, I, C, GW>(a, smem_raw, lane, acc);
  }
  __syncthreads();  // the staging area free
  wdense_store<T, acc_t, I, C>(a, smem_raw, lane, acc);
  __syncthreads();  // every slice's sums stored
  bwd_weight_flush<T, acc_t, I>(a, blockIdx.x, smem_raw, threadIdx.x, blockDim.x);
}

template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_backward_weight_direct_kernel(
    const BwdWeightArgs<T, acc_t, I> a, int64_t total) {
  for (int64_t se = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; se < total;
       se += int64_t(gridDim.x) * blockDim.x) {
    bwd_weight_direct_item<T, acc_t, I>(a, se);
  }
}

// Launched with kMaxThreads threads (kReduceParts x kReduceElems) and
// reduce_partials_smem_bytes; each block loops over its groups of
// kReduceElems elements.
template <typename T, typename acc_t, typename I>
__global__ void __launch_bounds__(kMaxThreads) conv_relu_maxpool2d_reduce_partials_kernel(
    const BwdWeightArgs<T, acc_t, I> a, int64_t rows) {
  FMNIST_DYNAMIC_SMEM(smem_raw);
  const int64_t groups = ceil_div(bwd_weight_elems(a.g), kReduceElems);
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    __syncthreads();  // the previous group's sums written out
    reduce_partials_range<T, acc_t, I>(a, rows, group, smem_raw, threadIdx.x);
    __syncthreads();  // every part's sum stored
    reduce_partials_tree<T, acc_t, I>(a, group, smem_raw, threadIdx.x);
  }
}

}  // namespace cuda
}  // namespace fmnist_ext
