// The per-thread and per-block work of the CUDA kernels of
// conv_relu_maxpool2d (see conv_relu_maxpool2d_kernel.cu for the design).
//
// Everything here is __host__ __device__ and free of ATen. The __global__
// kernels (kernels_global.cuh) run these phases with __syncthreads() between
// them; the same kernels are compiled by nvcc for the GPU and by a host C++
// compiler for the execution harness in tests/cuda_emulation, which runs the
// threads of a block concurrently with a real barrier.
#pragma once

// The parts, one job each:
//   kernels_common.cuh           geometry, staging, vector loads
//   kernels_forward.cuh          the forward
//   kernels_backward_input.cuh   grad_input
//   kernels_backward_weight.cuh  grad_weight and grad_bias, and the reduction of partial sums
#include "kernels_backward_input.cuh"
#include "kernels_backward_weight.cuh"
#include "kernels_common.cuh"
#include "kernels_forward.cuh"
