// Interface of the warp-level access counter (counter.cpp) that the counting
// build of the execution harness (FMNIST_EMU_COUNT; driver.build_counter)
// links in. That build compiles the kernels with GCC's kernel-address
// sanitizer instrumentation turned into plain calls (every load and store of
// the translation unit calls __asan_{load,store}N_noabort); counter.cpp
// defines those calls, keeps the accesses of kernel threads that hit the
// block's shared memory or a registered global buffer, and at the end of each
// block groups the accesses of the 32 lanes of each warp that are the k-th
// execution of one instruction (the hook's call site) into warp requests,
// as the warp runs them in SIMT. The kernels'
// source is unchanged (load_vec's host branch has one hook so that a 16-byte
// vector load counts as one access, as on the GPU).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace fmnist_emu {
namespace count {

// A host buffer that stands for global memory (tensors of the harness).
void register_global(const void* p, size_t bytes);
// A launch of `threads` threads per block with `smem` bytes of shared memory.
void begin_launch(unsigned threads, size_t smem);
// Called by CUDA thread `tid` before it runs a block whose shared memory is
// smem[0, smem_bytes); end_thread when its body returned.
void begin_thread(unsigned tid, const unsigned char* smem);
void end_thread();
// One __syncthreads by the calling thread.
void barrier();
// load_vec's copy of `bytes` bytes from p to dst, counted as loads of
// `width` bytes each (the GPU's vector loads).
void vector_load(const void* p, void* dst, size_t bytes, size_t width);
// Called once per block, by one thread, after all its threads finished.
void end_block();
// The launch's counts as "key=value ..." (see counter.cpp).
std::string end_launch();

}  // namespace count
}  // namespace fmnist_emu
