// CPU implementation of fmnist_ext::conv_relu_maxpool2d and its backward.
//
// This file checks the arguments, allocates the outputs, splits the batch
// across threads with at::parallel_for and hands each range of images to the
// kernels in kernels_impl.h, built for the best instruction set the CPU
// supports (AVX-512, AVX2+FMA, or the baseline). FMNIST_CPU_ISA=default|avx2|
// avx512 in the environment picks a lower one (the tests use it to check every
// build). grad_weight/grad_bias are summed into one private buffer per worker
// thread and added up at the end, so the kernels need no atomics.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

#include "../checks.h"
#include "isa.h"

namespace fmnist_ext {
namespace cpu {
namespace {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "default";
  }
}

Isa best_supported_isa() {
#if defined(FMNIST_HAVE_X86_ISAS)
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return Isa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return Isa::kAvx2;
    }
    return Isa::kDefault;
  }();
  return best;
#else
  return Isa::kDefault;
#endif
}

// The build used by this call: the best supported one, or a lower one asked
// for through FMNIST_CPU_ISA (read on every call so tests can switch it).
Isa active_isa() {
  const Isa best = best_supported_isa();
  const char* env = std::getenv("FMNIST_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  Isa want;
  if (std::strcmp(env, "default") == 0) {
    want = Isa::kDefault;
  } else if (std::strcmp(env, "avx2") == 0) {
    want = Isa::kAvx2;
  } else if (std::strcmp(env, "avx512") == 0) {
    want = Isa::kAvx512;
  } else {
    TORCH_CHECK_VALUE(false, "FMNIST_CPU_ISA must be one of default, avx2, avx512; got '", env,
                      "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "FMNIST_CPU_ISA=", env,
                    " is not supported by this CPU (best: ", isa_name(best), ")");
  return want;
}

std::string active_isa_name() { return isa_name(active_isa()); }
std::string best_isa_name() { return isa_name(best_supported_isa()); }

template <typename T, typename I>
void run_forward(Isa isa, const ForwardArgs<T, I>& a, int64_t n0, int64_t n1) {
#if defined(FMNIST_HAVE_X86_ISAS)
  if (isa == Isa::kAvx512) return isa_avx512::forward_images(a, n0, n1);
  if (isa == Isa::kAvx2) return isa_avx2::forward_images(a, n0, n1);
#endif
  isa_default::forward_images(a, n0, n1);
}

template <typename T, typename I>
void run_backward(Isa isa, const BackwardArgs<T, I>& a, int64_t n0, int64_t n1) {
#if defined(FMNIST_HAVE_X86_ISAS)
  if (isa == Isa::kAvx512) return isa_avx512::backward_images(a, n0, n1);
  if (isa == Isa::kAvx2) return isa_avx2::backward_images(a, n0, n1);
#endif
  isa_default::backward_images(a, n0, n1);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "conv_relu_maxpool2d: expected ", name,
                    " on the CPU (this is the CPU kernel), got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> conv_relu_maxpool2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef padding, int64_t pool) {
  const ConvPoolGeometry g = check_conv_relu_maxpool2d_args(input, weight, bias, padding, pool);
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cpu(*bias, "bias");

  at::Tensor out = at::empty({g.n, g.cout, g.ph, g.pw}, input.options());
  at::Tensor indices =
      at::empty({g.n, g.cout, g.ph, g.pw}, input.options().dtype(index_dtype_for_pool(pool)));
  if (out.numel() == 0) return {out, indices};

  const at::Tensor w = weight.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  const Isa isa = active_isa();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_forward_cpu", [&] {
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      ForwardArgs<scalar_t, I> a{
          g,
          input.const_data_ptr<scalar_t>(),
          {input.stride(0), input.stride(1), input.stride(2), input.stride(3)},
          w.const_data_ptr<scalar_t>(),
          has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
          out.mutable_data_ptr<scalar_t>(),
          static_cast<I*>(indices.mutable_data_ptr())};
      at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) { run_forward(isa, a, n0, n1); });
    });
  });
  return {out, indices};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_relu_maxpool2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& indices, c10::IntArrayRef padding, int64_t pool,
    std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g =
      check_conv_relu_maxpool2d_args(input, weight, std::nullopt, padding, pool);
  check_backward_args(grad_output, indices, g, input);
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  check_cpu(grad_output, "grad_output");

  const auto opts = input.options();
  at::Tensor grad_input =
      output_mask[0] ? at::empty({g.n, g.cin, g.h, g.w}, opts) : at::empty({0}, opts);
  at::Tensor grad_weight =
      output_mask[1] ? at::zeros_like(weight, at::MemoryFormat::Contiguous) : at::empty({0}, opts);
  at::Tensor grad_bias = output_mask[2] ? at::zeros({g.cout}, opts) : at::empty({0}, opts);
  if (g.n == 0) return {grad_input, grad_weight, grad_bias};

  const at::Tensor go = grad_output.contiguous();
  const at::Tensor idx = indices.contiguous();
  const at::Tensor w = weight.contiguous();
  const Isa isa = active_isa();
  // One partial sum per worker thread, added up below.
  const int64_t workers = at::get_num_threads();
  // Partial grad_weight sums have their filter rows padded to whole vectors.
  int64_t kwp = 0;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "padded_kw",
                             [&] { kwp = padded_kw<scalar_t>(g.kw); });
  const int64_t wsize = g.cout * g.cin * g.kh * kwp;
  at::Tensor gw_parts = output_mask[1] ? at::zeros({workers, wsize}, opts) : at::Tensor();
  at::Tensor gb_parts = output_mask[2] ? at::zeros({workers, g.cout}, opts) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_relu_maxpool2d_backward_cpu", [&] {
    dispatch_index_type(pool, [&](auto index_tag) {
      using I = decltype(index_tag);
      BackwardArgs<scalar_t, I> a{
          g,
          input.const_data_ptr<scalar_t>(),
          {input.stride(0), input.stride(1), input.stride(2), input.stride(3)},
          w.const_data_ptr<scalar_t>(),
          go.const_data_ptr<scalar_t>(),
          static_cast<const I*>(idx.const_data_ptr()),
          output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr,
          nullptr,
          nullptr};
      at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
        const int64_t t = at::get_thread_num();
        TORCH_INTERNAL_ASSERT(t >= 0 && t < workers);
        BackwardArgs<scalar_t, I> mine = a;
        if (output_mask[1])
          mine.grad_weight_part = gw_parts.mutable_data_ptr<scalar_t>() + t * wsize;
        if (output_mask[2])
          mine.grad_bias_part = gb_parts.mutable_data_ptr<scalar_t>() + t * g.cout;
        run_backward(isa, mine, n0, n1);
      });
    });
  });
  if (output_mask[1]) {
    grad_weight.copy_(gw_parts.sum(0).view({g.cout, g.cin, g.kh, kwp}).narrow(3, 0, g.kw));
  }
  if (output_mask[2]) grad_bias.copy_(gb_parts.sum(0));
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace fmnist_ext

TORCH_LIBRARY_IMPL(fmnist_ext, CPU, m) {
  m.impl("conv_relu_maxpool2d", &fmnist_ext::cpu::conv_relu_maxpool2d_forward_cpu);
  m.impl("_conv_relu_maxpool2d_backward", &fmnist_ext::cpu::conv_relu_maxpool2d_backward_cpu);
}

TORCH_LIBRARY_FRAGMENT(fmnist_ext, m) {
  // Which CPU kernel build runs (default / avx2 / avx512); for diagnostics.
  m.def("_cpu_isa() -> str", &fmnist_ext::cpu::active_isa_name);
  // The best build this CPU supports, whatever FMNIST_CPU_ISA says (so the
  // Python side can validate that variable with a clear message).
  m.def("_cpu_best_isa() -> str", &fmnist_ext::cpu::best_isa_name);
}
