// CPU implementation of fmnist_ext::conv_relu_maxpool2d and its backward.
//
// This file checks the arguments, allocates the outputs, splits the batch
// across threads with torch::stable::parallel_for and hands each range of images to the
// kernels in kernels.h, built for the best instruction set the CPU
// supports (AVX-512, AVX2+FMA, or the baseline). FMNIST_CPU_ISA=default|avx2|
// avx512 in the environment picks a lower one (the tests use it to check every
// build). grad_weight/grad_bias are summed into one private buffer per batch
// slice (as many slices as threads) and added up at the end in slice order,
// so the kernels need no atomics.
//
// Host code on the LibTorch stable ABI (../stable_api.h): allocation, the
// contiguous copies and the thread pool are torch's, reached through the
// stable C shim once per call (never per element or per image).
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../stable_api.h"
#include "conv_cpu.h"
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
    FMNIST_CHECK_VALUE(false, "FMNIST_CPU_ISA must be one of default, avx2, avx512; got '", env,
                       "'");
  }
  FMNIST_CHECK_VALUE(static_cast<int>(want) <= static_cast<int>(best), "FMNIST_CPU_ISA=", env,
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

void check_cpu(const Tensor& t, const char* name) {
  FMNIST_CHECK_VALUE(t.is_cpu(), "conv_relu_maxpool2d: expected ", name,
                     " on the CPU (this is the CPU kernel), got ", device_of(t));
}

}  // namespace

std::tuple<Tensor, Tensor> conv_relu_maxpool2d_forward_cpu(const Tensor& input,
                                                           const Tensor& weight,
                                                           const std::optional<Tensor>& bias,
                                                           std::vector<int64_t> padding,
                                                           int64_t pool) {
  const ConvPoolGeometry g = check_conv_relu_maxpool2d_args(input, weight, bias, padding, pool);
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) check_cpu(*bias, "bias");

  Tensor out = empty_on(input, {g.n, g.cout, g.ph, g.pw});
  Tensor indices = empty_on(input, {g.n, g.cout, g.ph, g.pw}, index_dtype_for_pool(pool));
  if (out.numel() == 0) return {out, indices};

  const Tensor w = fmnist_ext::contiguous(weight);
  const Tensor b = has_bias ? fmnist_ext::contiguous(*bias) : Tensor();
  const Isa isa = active_isa();
  dispatch_floating(input.scalar_type(), "conv_relu_maxpool2d", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
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
      torch::stable::parallel_for(0, g.n, 1,
                                  [&](int64_t n0, int64_t n1) { run_forward(isa, a, n0, n1); });
    });
  });
  return {out, indices};
}

namespace {

std::tuple<Tensor, Tensor, Tensor> conv_relu_maxpool2d_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& weight, const Tensor& indices,
    std::vector<int64_t> padding, int64_t pool, std::vector<bool> output_mask) {
  const ConvPoolGeometry g =
      check_conv_relu_maxpool2d_args(input, weight, std::nullopt, padding, pool);
  check_backward_args(grad_output, indices, g, input);
  check_cpu(input, "input");
  check_cpu(weight, "weight");
  check_cpu(grad_output, "grad_output");

  FMNIST_CHECK_VALUE(output_mask.size() == 3, "_conv_relu_maxpool2d_backward",
                     ": expected output_mask of 3 elements, got ", output_mask.size());
  Tensor grad_input = empty_on(
      input, output_mask[0] ? std::vector<int64_t>{g.n, g.cin, g.h, g.w} : std::vector<int64_t>{0});
  Tensor grad_weight =
      output_mask[1] ? zeros_on(input, {g.cout, g.cin, g.kh, g.kw}) : empty_on(input, {0});
  Tensor grad_bias = output_mask[2] ? zeros_on(input, {g.cout}) : empty_on(input, {0});
  if (g.n == 0) return {grad_input, grad_weight, grad_bias};

  const Tensor go = fmnist_ext::contiguous(grad_output);
  const Tensor idx = fmnist_ext::contiguous(indices);
  const Tensor w = fmnist_ext::contiguous(weight);
  const Isa isa = active_isa();
  // One partial sum per worker, added up below. Worker t takes images
  // [t * per, (t + 1) * per), the split the old at::parallel_for made of it,
  // so each buffer has one owner without asking which thread runs it.
  const int64_t workers = std::max<int64_t>(
      1, std::min<int64_t>(g.n, static_cast<int64_t>(torch::stable::get_num_threads())));
  const int64_t per = (g.n + workers - 1) / workers;
  // Partial grad_weight sums have their filter rows padded to whole vectors.
  int64_t kwp = 0;
  dispatch_floating(input.scalar_type(), "_conv_relu_maxpool2d_backward",
                    [&](auto scalar_tag) { kwp = padded_kw<decltype(scalar_tag)>(g.kw); });
  const int64_t wsize = g.cout * g.cin * g.kh * kwp;
  Tensor gw_parts = output_mask[1] ? zeros_on(input, {workers, wsize}) : Tensor();
  Tensor gb_parts = output_mask[2] ? zeros_on(input, {workers, g.cout}) : Tensor();

  dispatch_floating(input.scalar_type(), "_conv_relu_maxpool2d_backward", [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
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
      const bool want_w = output_mask[1], want_b = output_mask[2];
      scalar_t* gw = want_w ? gw_parts.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* gb = want_b ? gb_parts.mutable_data_ptr<scalar_t>() : nullptr;
      torch::stable::parallel_for(0, workers, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          BackwardArgs<scalar_t, I> mine = a;
          if (want_w) mine.grad_weight_part = gw + t * wsize;
          if (want_b) mine.grad_bias_part = gb + t * g.cout;
          const int64_t n0 = t * per, n1 = std::min(g.n, n0 + per);
          if (n0 < n1) run_backward(isa, mine, n0, n1);
        }
      });
      // The workers' partial sums, added in worker order (deterministic).
      if (want_w) {
        scalar_t* out = grad_weight.mutable_data_ptr<scalar_t>();
        const int64_t rows = g.cout * g.cin * g.kh;
        for (int64_t t = 0; t < workers; ++t) {
          const scalar_t* part = gw + t * wsize;
          for (int64_t r = 0; r < rows; ++r) {
            for (int64_t k = 0; k < g.kw; ++k) out[r * g.kw + k] += part[r * kwp + k];
          }
        }
      }
      if (want_b) {
        scalar_t* out = grad_bias.mutable_data_ptr<scalar_t>();
        for (int64_t t = 0; t < workers; ++t) {
          for (int64_t c = 0; c < g.cout; ++c) out[c] += gb[t * g.cout + c];
        }
      }
    });
  });
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace cpu
}  // namespace fmnist_ext

STABLE_TORCH_LIBRARY_IMPL(fmnist_ext, CPU, m) {
  m.impl("conv_relu_maxpool2d", TORCH_BOX(&fmnist_ext::cpu::conv_relu_maxpool2d_forward_cpu));
  m.impl("_conv_relu_maxpool2d_backward",
         TORCH_BOX(&fmnist_ext::cpu::conv_relu_maxpool2d_backward_cpu));
}

STABLE_TORCH_LIBRARY_FRAGMENT(fmnist_ext, m) {
  // Which CPU kernel build runs (default / avx2 / avx512); for diagnostics.
  m.def("_cpu_isa() -> str");
  // The best build this CPU supports, whatever FMNIST_CPU_ISA says (so the
  // Python side can validate that variable with a clear message).
  m.def("_cpu_best_isa() -> str");
}

// No tensor argument: the kernels serve every dispatch key.
STABLE_TORCH_LIBRARY_IMPL(fmnist_ext, CompositeImplicitAutograd, m) {
  m.impl("_cpu_isa", TORCH_BOX(&fmnist_ext::cpu::active_isa_name));
  m.impl("_cpu_best_isa", TORCH_BOX(&fmnist_ext::cpu::best_isa_name));
}
