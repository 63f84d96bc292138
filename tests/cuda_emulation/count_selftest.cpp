// Self-test of the warp-level counter (counter.cpp): tiny kernels whose
// shared-memory wavefronts and global sectors are known by construction,
// compiled and run exactly like the kernels in the counting build
// (driver.build_counter). Prints one "name key=value..." line per kernel;
// tests/op/test_cuda_counter.py checks the numbers.
#include "shim.h"  // first: the CUDA stand-ins (FMNIST_EMU_COUNT is defined)

#include <cstdio>
#include <vector>

#include "cuda/kernels.cuh"  // load_vec, the kernels' vector load

namespace {

float g_in[64 * 32 * 2];
float g_out[64];
double g_out_d[64];

__global__ void shared_stride2() {  // lane t reads word 2t: 2-way conflict
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  g_out[threadIdx.x] = s[2 * threadIdx.x];
}
__global__ void shared_stride1() {  // lane t reads word t: conflict-free
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  g_out[threadIdx.x] = s[threadIdx.x];
}
__global__ void shared_broadcast() {  // every lane reads word 5: broadcast
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  g_out[threadIdx.x] = s[5];
}
__global__ void shared_stride32() {  // lane t reads word 32t: all in bank 0
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  g_out[threadIdx.x] = s[32 * threadIdx.x];
}
__global__ void shared_double() {  // 8-byte loads, lane t word pair t: 2 wavefronts
  FMNIST_DYNAMIC_SMEM(raw);
  const double* s = reinterpret_cast<const double*>(raw);
  g_out_d[threadIdx.x] = s[threadIdx.x];
}
__global__ void shared_float4() {  // load_vec of 4 floats at 4t: 512 bytes, 4 wavefronts
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  float v[4];
  fmnist_ext::cuda::load_vec(s + 4 * threadIdx.x, v);
  g_out[threadIdx.x] = v[0] + v[1] + v[2] + v[3];
}
__global__ void shared_float4_broadcast() {  // load_vec of the same 4 floats: 1
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  float v[4];
  fmnist_ext::cuda::load_vec(s + 8, v);
  g_out[threadIdx.x] = v[0] + v[1] + v[2] + v[3];
}
__global__ void global_coalesced() {  // in[t] -> smem: 4 sectors per warp
  FMNIST_DYNAMIC_SMEM(raw);
  reinterpret_cast<float*>(raw)[threadIdx.x] = g_in[threadIdx.x];
}
__global__ void global_stride32() {  // in[32t] -> smem: 32 sectors per warp
  FMNIST_DYNAMIC_SMEM(raw);
  reinterpret_cast<float*>(raw)[threadIdx.x] = g_in[32 * threadIdx.x];
}
__global__ void global_divergent() {  // even lanes load in[t], then all in[32 + t]
  FMNIST_DYNAMIC_SMEM(raw);
  float* s = reinterpret_cast<float*>(raw);
  if (threadIdx.x % 2 == 0) s[threadIdx.x] = g_in[threadIdx.x];
  s[64 + threadIdx.x] = g_in[32 + threadIdx.x];
}
__global__ void shared_divergent() {  // even lanes: 16 words of bank 0; all: 32 of bank 1
  FMNIST_DYNAMIC_SMEM(raw);
  const float* s = reinterpret_cast<const float*>(raw);
  const unsigned lane = threadIdx.x % 32;
  float v = 0;
  if (lane % 2 == 0) v = s[32 * lane];
  g_out[threadIdx.x] = v + s[32 * lane + 1];
}
__global__ void barriers() {  // two __syncthreads, no memory
  __syncthreads();
  __syncthreads();
}

template <typename K>
void run(const char* name, K kernel, unsigned blocks) {
  namespace c = fmnist_emu::count;
  fmnist_emu::run_grid(dim3(blocks), 64, 64 * 32 * sizeof(float), 1, [&] { kernel(); });
  std::printf("%s %s\n", name, c::end_launch().c_str());
}

}  // namespace

int main() {
  namespace c = fmnist_emu::count;
  c::register_global(g_in, sizeof g_in);
  c::register_global(g_out, sizeof g_out);
  c::register_global(g_out_d, sizeof g_out_d);
  // 64 threads = 2 warps per block, 3 blocks: every count is 6x the one of
  // a single warp request.
  run("shared_stride2", shared_stride2, 3);
  run("shared_stride1", shared_stride1, 3);
  run("shared_broadcast", shared_broadcast, 3);
  run("shared_stride32", shared_stride32, 3);
  run("shared_double", shared_double, 3);
  run("shared_float4", shared_float4, 3);
  run("shared_float4_broadcast", shared_float4_broadcast, 3);
  run("global_coalesced", global_coalesced, 3);
  run("global_stride32", global_stride32, 3);
  run("global_divergent", global_divergent, 3);
  run("shared_divergent", shared_divergent, 3);
  run("barriers", barriers, 3);
  return 0;
}
