// CPU kernel of fmnist_ext::fashion_cnn_inference (schema and meaning:
// csrc/fashion_cnn_inference.cpp).
//
// The two conv blocks run the conv_relu_maxpool2d CPU kernel (the very
// function the dispatcher runs for that op, conv_cpu.h, called directly); the
// three Linear layers are addmm (torch's, through the stable C shim) + ReLU,
// or plain loops for small batches. Everything is checked here first, naming
// the argument, so that a direct torch.ops call cannot reach a kernel with bad
// sizes. The refusal of inputs that require gradients (while grad mode is on)
// is the op's Python Autograd kernel's (fmnist_ext/inference.py): the stable
// ABI cannot read a tensor's requires_grad.
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../stable_api.h"
#include "conv_cpu.h"

namespace fmnist_ext {
namespace cpu {
namespace {

constexpr const char* kOp = "fashion_cnn_inference";

void check_same(const Tensor& input, const Tensor& t, const char* name) {
  FMNIST_CHECK_TYPE(t.scalar_type() == input.scalar_type(), kOp, ": expected ", name,
                    " to have the dtype of input (", input.scalar_type(), "), got ",
                    t.scalar_type());
  FMNIST_CHECK_VALUE(t.is_cpu(), kOp, ": expected ", name,
                     " on the CPU (this is the CPU kernel), got ", device_of(t));
}

void check_dims(const Tensor& t, int64_t dim, const char* name) {
  FMNIST_CHECK_VALUE(t.dim() == dim, kOp, ": expected ", name, " to be a ", dim,
                     "-D tensor, got a ", t.dim(), "-D tensor");
}

// Linear layer `name`: weight [out, in] must take `in_features` inputs.
void check_linear(const Tensor& w, const Tensor& b, int64_t in_features, const char* wname,
                  const char* bname) {
  check_dims(w, 2, wname);
  check_dims(b, 1, bname);
  FMNIST_CHECK_VALUE(w.size(1) == in_features, kOp, ": expected ", wname,
                     ".size(1) = ", in_features, " (the previous layer's outputs), got ",
                     w.size(1));
  FMNIST_CHECK_VALUE(b.size(0) == w.size(0), kOp, ": expected ", bname, " of length ", w.size(0),
                     ", got ", b.size(0));
}

// Batches up to this size run the Linear layers as plain loops: at batch 1 a
// BLAS call's dispatch overhead is several times the ~23k multiply-adds.
constexpr int64_t kSmallBatch = 8;

// y[n][o] = b[o] + sum_i w[o][i] * x[n][i] (then ReLU if asked). Eight
// independent partial sums per dot product, so the compiler vectorizes the
// loop without reassociating a single sum (no -ffast-math needed).
template <typename T>
void small_linear(const T* x, int64_t batch, int64_t in, const T* w, const T* b, int64_t out,
                  bool relu, T* y) {
  constexpr int kAcc = 8;
  for (int64_t n = 0; n < batch; ++n) {
    const T* xn = x + n * in;
    for (int64_t o = 0; o < out; ++o) {
      const T* wo = w + o * in;
      T acc[kAcc] = {};
      int64_t i = 0;
      for (; i + kAcc <= in; i += kAcc) {
        for (int l = 0; l < kAcc; ++l) acc[l] += wo[i + l] * xn[i + l];
      }
      T s = b[o];
      for (int l = 0; l < kAcc; ++l) s += acc[l];
      for (; i < in; ++i) s += wo[i] * xn[i];
      y[n * out + o] = relu && !(s > T(0)) && s == s ? T(0) : s;  // ReLU keeps NaN, like at::relu
    }
  }
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b, bool relu) {
  Tensor y = empty_on(x, {x.size(0), w.size(0)});
  if (x.size(0) > kSmallBatch) {
    // y = b + x w^T (torch's addmm), then ReLU in place.
    const Tensor wt = torch::stable::transpose(w, 0, 1);
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(y.get(), b.get(), x.get(), wt.get(), 1.0, 1.0));
    if (relu) {
      dispatch_floating(x.scalar_type(), kOp, [&](auto scalar_tag) {
        using T = decltype(scalar_tag);
        T* p = y.mutable_data_ptr<T>();
        for (int64_t i = 0, n = y.numel(); i < n; ++i) {
          p[i] = !(p[i] > T(0)) && p[i] == p[i] ? T(0) : p[i];  // ReLU keeps NaN, like at::relu
        }
      });
    }
    return y;
  }
  const Tensor xc = fmnist_ext::contiguous(x), wc = fmnist_ext::contiguous(w),
               bc = fmnist_ext::contiguous(b);
  dispatch_floating(x.scalar_type(), kOp, [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    small_linear<scalar_t>(xc.const_data_ptr<scalar_t>(), x.size(0), x.size(1),
                           wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), w.size(0),
                           relu, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

Tensor conv_block(const Tensor& x, const Tensor& w, const Tensor& b) {
  return std::get<0>(conv_relu_maxpool2d_forward_cpu(x, w, b, {0, 0}, 2));
}

Tensor fashion_cnn_inference_cpu(const Tensor& input, const Tensor& conv1_weight,
                                 const Tensor& conv1_bias, const Tensor& conv2_weight,
                                 const Tensor& conv2_bias, const Tensor& fc1_weight,
                                 const Tensor& fc1_bias, const Tensor& fc2_weight,
                                 const Tensor& fc2_bias, const Tensor& out_weight,
                                 const Tensor& out_bias) {
  check_dims(input, 4, "input");
  FMNIST_CHECK_TYPE(
      input.scalar_type() == ScalarType::Float || input.scalar_type() == ScalarType::Double, kOp,
      ": expected input to be float32 or float64, got ", input.scalar_type());
  check_same(input, input, "input");
  const std::pair<const Tensor*, const char*> params[] = {
      {&conv1_weight, "conv1_weight"}, {&conv1_bias, "conv1_bias"}, {&conv2_weight, "conv2_weight"},
      {&conv2_bias, "conv2_bias"},     {&fc1_weight, "fc1_weight"}, {&fc1_bias, "fc1_bias"},
      {&fc2_weight, "fc2_weight"},     {&fc2_bias, "fc2_bias"},     {&out_weight, "out_weight"},
      {&out_bias, "out_bias"}};
  for (const auto& [t, name] : params) check_same(input, *t, name);
  check_dims(conv1_weight, 4, "conv1_weight");
  check_dims(conv2_weight, 4, "conv2_weight");
  check_dims(conv1_bias, 1, "conv1_bias");
  check_dims(conv2_bias, 1, "conv2_bias");
  FMNIST_CHECK_VALUE(conv1_weight.size(1) == input.size(1), kOp,
                     ": expected input.size(1) (channels) = conv1_weight.size(1) = ",
                     conv1_weight.size(1), ", got ", input.size(1));
  FMNIST_CHECK_VALUE(conv2_weight.size(1) == conv1_weight.size(0), kOp,
                     ": expected conv2_weight.size(1) = conv1_weight.size(0) = ",
                     conv1_weight.size(0), ", got ", conv2_weight.size(1));
  FMNIST_CHECK_VALUE(conv1_bias.size(0) == conv1_weight.size(0), kOp,
                     ": expected conv1_bias of length ", conv1_weight.size(0), ", got ",
                     conv1_bias.size(0));
  FMNIST_CHECK_VALUE(conv2_bias.size(0) == conv2_weight.size(0), kOp,
                     ": expected conv2_bias of length ", conv2_weight.size(0), ", got ",
                     conv2_bias.size(0));
  // Spatial sizes through both blocks (stride 1, no padding, pool 2).
  int64_t h = input.size(2), w = input.size(3);
  for (const Tensor* cw : {&conv1_weight, &conv2_weight}) {
    const int64_t oh = h - cw->size(2) + 1, ow = w - cw->size(3) + 1;
    FMNIST_CHECK_VALUE(oh >= 2 && ow >= 2, kOp, ": input of spatial size ", input.size(2), "x",
                       input.size(3), " is too small for the two conv blocks");
    h = oh / 2;
    w = ow / 2;
  }
  const int64_t features = conv2_weight.size(0) * h * w;
  check_linear(fc1_weight, fc1_bias, features, "fc1_weight", "fc1_bias");
  check_linear(fc2_weight, fc2_bias, fc1_weight.size(0), "fc2_weight", "fc2_bias");
  check_linear(out_weight, out_bias, fc2_weight.size(0), "out_weight", "out_bias");

  const Tensor x2 =
      conv_block(conv_block(input, conv1_weight, conv1_bias), conv2_weight, conv2_bias);
  const Tensor h1 =
      linear(torch::stable::view(x2, {x2.size(0), features}), fc1_weight, fc1_bias, true);
  const Tensor h2 = linear(h1, fc2_weight, fc2_bias, true);
  return linear(h2, out_weight, out_bias, false);
}

}  // namespace
}  // namespace cpu
}  // namespace fmnist_ext

STABLE_TORCH_LIBRARY_IMPL(fmnist_ext, CPU, m) {
  m.impl("fashion_cnn_inference", TORCH_BOX(&fmnist_ext::cpu::fashion_cnn_inference_cpu));
}
