// CPU kernel of fmnist_ext::fashion_cnn_inference (schema and meaning:
// csrc/fashion_cnn_inference.cpp).
//
// The two conv blocks run the registered conv_relu_maxpool2d CPU kernel
// (called through the dispatcher, so this file shares no code with the
// kernels and cannot drift from them); the three Linear layers are addmm +
// in-place ReLU, or plain loops for small batches. Everything is checked here first, naming the
// argument, so that a direct torch.ops call cannot reach a kernel with bad sizes.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fmnist_ext {
namespace cpu {
namespace {

constexpr const char* kOp = "fashion_cnn_inference";

void check_same(const at::Tensor& input, const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), kOp, ": expected ", name,
                   " to have the dtype of input (", input.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, ": expected ", name,
                    " on the CPU (this is the CPU kernel), got ", t.device());
  TORCH_CHECK(!(t.requires_grad() && at::GradMode::is_enabled()), kOp,
              ": computes no gradients, but ", name,
              " requires grad; call it under torch.no_grad() or train the FashionCNN instead");
}

void check_dims(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, kOp, ": expected ", name, " to be a ", dim, "-D tensor, got a ",
                    t.dim(), "-D tensor");
}

// Linear layer `name`: weight [out, in] must take `in_features` inputs.
void check_linear(const at::Tensor& w, const at::Tensor& b, int64_t in_features, const char* wname,
                  const char* bname) {
  check_dims(w, 2, wname);
  check_dims(b, 1, bname);
  TORCH_CHECK_VALUE(w.size(1) == in_features, kOp, ": expected ", wname, ".size(1) = ", in_features,
                    " (the previous layer's outputs), got ", w.size(1));
  TORCH_CHECK_VALUE(b.size(0) == w.size(0), kOp, ": expected ", bname, " of length ", w.size(0),
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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, bool relu) {
  if (x.size(0) > kSmallBatch) {
    at::Tensor y = at::addmm(b, x, w.t());
    return relu ? y.relu_() : y;
  }
  const at::Tensor xc = x.contiguous(), wc = w.contiguous(), bc = b.contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fashion_cnn_inference_linear", [&] {
    small_linear<scalar_t>(xc.const_data_ptr<scalar_t>(), x.size(0), x.size(1),
                           wc.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(), w.size(0),
                           relu, y.mutable_data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor conv_block(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fmnist_ext::conv_relu_maxpool2d", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, c10::IntArrayRef, int64_t)>();
  const int64_t padding[2] = {0, 0};
  return std::get<0>(op.call(x, w, b, padding, 2));
}

at::Tensor fashion_cnn_inference_cpu(const at::Tensor& input, const at::Tensor& conv1_weight,
                                     const at::Tensor& conv1_bias, const at::Tensor& conv2_weight,
                                     const at::Tensor& conv2_bias, const at::Tensor& fc1_weight,
                                     const at::Tensor& fc1_bias, const at::Tensor& fc2_weight,
                                     const at::Tensor& fc2_bias, const at::Tensor& out_weight,
                                     const at::Tensor& out_bias) {
  check_dims(input, 4, "input");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble, kOp,
                   ": expected input to be float32 or float64, got ", input.scalar_type());
  check_same(input, input, "input");
  const std::pair<const at::Tensor*, const char*> params[] = {
      {&conv1_weight, "conv1_weight"}, {&conv1_bias, "conv1_bias"}, {&conv2_weight, "conv2_weight"},
      {&conv2_bias, "conv2_bias"},     {&fc1_weight, "fc1_weight"}, {&fc1_bias, "fc1_bias"},
      {&fc2_weight, "fc2_weight"},     {&fc2_bias, "fc2_bias"},     {&out_weight, "out_weight"},
      {&out_bias, "out_bias"}};
  for (const auto& [t, name] : params) check_same(input, *t, name);
  check_dims(conv1_weight, 4, "conv1_weight");
  check_dims(conv2_weight, 4, "conv2_weight");
  check_dims(conv1_bias, 1, "conv1_bias");
  check_dims(conv2_bias, 1, "conv2_bias");
  TORCH_CHECK_VALUE(conv1_weight.size(1) == input.size(1), kOp,
                    ": expected input.size(1) (channels) = conv1_weight.size(1) = ",
                    conv1_weight.size(1), ", got ", input.size(1));
  TORCH_CHECK_VALUE(conv2_weight.size(1) == conv1_weight.size(0), kOp,
                    ": expected conv2_weight.size(1) = conv1_weight.size(0) = ",
                    conv1_weight.size(0), ", got ", conv2_weight.size(1));
  TORCH_CHECK_VALUE(conv1_bias.size(0) == conv1_weight.size(0), kOp,
                    ": expected conv1_bias of length ", conv1_weight.size(0), ", got ",
                    conv1_bias.size(0));
  TORCH_CHECK_VALUE(conv2_bias.size(0) == conv2_weight.size(0), kOp,
                    ": expected conv2_bias of length ", conv2_weight.size(0), ", got ",
                    conv2_bias.size(0));
  // Spatial sizes through both blocks (stride 1, no padding, pool 2).
  int64_t h = input.size(2), w = input.size(3);
  for (const at::Tensor* cw : {&conv1_weight, &conv2_weight}) {
    const int64_t oh = h - cw->size(2) + 1, ow = w - cw->size(3) + 1;
    TORCH_CHECK_VALUE(oh >= 2 && ow >= 2, kOp, ": input of spatial size ", input.size(2), "x",
                      input.size(3), " is too small for the two conv blocks");
    h = oh / 2;
    w = ow / 2;
  }
  const int64_t features = conv2_weight.size(0) * h * w;
  check_linear(fc1_weight, fc1_bias, features, "fc1_weight", "fc1_bias");
  check_linear(fc2_weight, fc2_bias, fc1_weight.size(0), "fc2_weight", "fc2_bias");
  check_linear(out_weight, out_bias, fc2_weight.size(0), "out_weight", "out_bias");

  // Below autograd: nothing here is recorded (the checks above refuse grads).
  at::AutoDispatchBelowADInplaceOrView guard;
  const at::Tensor x2 =
      conv_block(conv_block(input, conv1_weight, conv1_bias), conv2_weight, conv2_bias);
  const at::Tensor h1 = linear(x2.view({x2.size(0), features}), fc1_weight, fc1_bias, true);
  const at::Tensor h2 = linear(h1, fc2_weight, fc2_bias, true);
  return linear(h2, out_weight, out_bias, false);
}

}  // namespace
}  // namespace cpu
}  // namespace fmnist_ext

TORCH_LIBRARY_IMPL(fmnist_ext, CPU, m) {
  m.impl("fashion_cnn_inference", &fmnist_ext::cpu::fashion_cnn_inference_cpu);
}
