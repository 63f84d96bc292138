// This GPU's peak rates, measured: the figures the CUDA cost counter's model
// takes from datasheets (scripts/cost_model/h200.py), plus the one it lacks.
//   * FP32 FMAs per SM and clock (the model: 128);
//   * warp-level mma.sync m16n8k8 TF32 FMAs per SM and clock: the tensor-core
//     route for block 2 needs it (NVIDIA publishes the dense TF32 rate, 494.7
//     TFLOPS on an H200, i.e. about 946 per SM and clock at 1.98 GHz, which
//     Hopper reaches through warpgroup wgmma; mma.sync's rate is unpublished);
//   * shared-memory wavefronts per SM and clock, conflict-free 4-byte loads
//     (the model: 1).
// Each kernel runs one wave of blocks (all resident at once), many
// independent chains per thread; a rate per clock is its operations over the
// SM count times the longest block's clock64() span, and the SM clock is that
// span over the event time. Prints one JSON object. Built and run by
// scripts/gpu_check.sh (step peak_rates):
//
//   nvcc -arch=sm_90 -O3 -o peak_rates peak_rates.cu && ./peak_rates
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#define CHECK(x)                                                   \
  do {                                                             \
    const cudaError_t e = (x);                                     \
    if (e != cudaSuccess) {                                        \
      std::fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e)); \
      std::exit(1);                                                \
    }                                                              \
  } while (0)

constexpr int kChains = 8;  // independent FMA / mma chains per thread or warp

__global__ void ffma_kernel(int iters, float b, float c, float* out, long long* span) {
  const long long t0 = clock64();
  float a[kChains];
  for (int j = 0; j < kChains; ++j) a[j] = threadIdx.x + j;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kChains; ++j) a[j] = fmaf(a[j], b, c);
  }
  float s = 0;
  for (int j = 0; j < kChains; ++j) s += a[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (threadIdx.x == 0) span[blockIdx.x] = clock64() - t0;
}

__global__ void mma_tf32_kernel(int iters, float x, float* out, long long* span) {
  const long long t0 = clock64();
  const uint32_t a = __float_as_uint(x + threadIdx.x), b = __float_as_uint(x - threadIdx.x);
  float d[kChains][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kChains; ++j) {
      asm volatile(
          "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
          "{%8,%9}, {%0,%1,%2,%3};\n"
          : "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
          : "r"(a), "r"(b), "r"(a), "r"(b), "r"(b), "r"(a));
    }
  }
  float s = 0;
  for (int j = 0; j < kChains; ++j) s += d[j][0] + d[j][1] + d[j][2] + d[j][3];
  out[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (threadIdx.x == 0) span[blockIdx.x] = clock64() - t0;
}

constexpr int kSmemWords = 4096;

__global__ void lds_kernel(int iters, int mask, float* out, long long* span) {
  __shared__ float s[kSmemWords];
  for (int i = threadIdx.x; i < kSmemWords; i += blockDim.x) s[i] = i;
  __syncthreads();
  const long long t0 = clock64();
  const int lane = threadIdx.x % 32;
  float acc[kChains] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kChains; ++j) acc[j] += s[((i * kChains + j) * 32 + lane) & mask];
  }
  float t = 0;
  for (int j = 0; j < kChains; ++j) t += acc[j];
  out[blockIdx.x * blockDim.x + threadIdx.x] = t;
  if (threadIdx.x == 0) span[blockIdx.x] = clock64() - t0;
}

struct Rate {
  double per_clk_sm, per_s, clock_hz;
};

// Runs launch(blocks, threads, out, span) twice (the first warms up) and
// turns `ops` operations into rates.
template <typename L>
Rate measure(int sms, int blocks, int threads, double ops, L launch) {
  float* out;
  long long* span;
  CHECK(cudaMalloc(&out, sizeof(float) * blocks * threads));
  CHECK(cudaMalloc(&span, sizeof(long long) * blocks));
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  launch(blocks, threads, out, span);
  CHECK(cudaEventRecord(e0));
  launch(blocks, threads, out, span);
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  CHECK(cudaGetLastError());
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  std::vector<long long> h(blocks);
  CHECK(cudaMemcpy(h.data(), span, sizeof(long long) * blocks, cudaMemcpyDeviceToHost));
  const double cycles = static_cast<double>(*std::max_element(h.begin(), h.end()));
  CHECK(cudaFree(out));
  CHECK(cudaFree(span));
  return {ops / (sms * cycles), ops / (ms * 1e-3), cycles / (ms * 1e-3)};
}

int main() {
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  const int iters = 4096;
  // One wave each: 2048, 1024 and 1024 threads per SM.
  const Rate f = measure(sms, sms * 8, 256, double(sms) * 8 * 256 * kChains * iters,
                         [&](int b, int t, float* o, long long* s) {
                           ffma_kernel<<<b, t>>>(iters, 0.999f, 1e-3f, o, s);
                         });
  const Rate m = measure(
      sms, sms * 4, 256, double(sms) * 4 * 8 * kChains * iters * (16 * 8 * 8),
      [&](int b, int t, float* o, long long* s) { mma_tf32_kernel<<<b, t>>>(iters, 1.5f, o, s); });
  const Rate l = measure(sms, sms * 4, 256, double(sms) * 4 * 8 * kChains * iters,
                         [&](int b, int t, float* o, long long* s) {
                           lds_kernel<<<b, t>>>(iters, kSmemWords - 1, o, s);
                         });
  std::printf(
      "{\"device\": \"%s\", \"sms\": %d, \"sm_clock_ghz\": %.3f,\n"
      " \"fp32_fma_per_clk_sm\": %.1f, \"fp32_tflops\": %.1f,\n"
      " \"mma_sync_tf32_fma_per_clk_sm\": %.1f, \"mma_sync_tf32_tflops\": %.1f,\n"
      " \"lds32_wavefronts_per_clk_sm\": %.3f}\n",
      prop.name, sms, f.clock_hz * 1e-9, f.per_clk_sm, 2 * f.per_s * 1e-12, m.per_clk_sm,
      2 * m.per_s * 1e-12, l.per_clk_sm);
  return 0;
}
