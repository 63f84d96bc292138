// Argument checks shared by every backend of conv_relu_maxpool2d.
//
// The Python API validates the same conditions before it dispatches (so the
// reference path and the fake kernel raise the same errors); these checks
// guard direct callers of torch.ops.fmnist_ext.* so that no input can reach a
// kernel with sizes it cannot handle. Messages name the argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "index_math.h"

namespace fmnist_ext {

struct ConvPoolShape {
  int64_t n, cin, h, w;      // input
  int64_t cout, kh, kw;      // weight
  int64_t pad_h, pad_w, pool;
  int64_t oh, ow;            // convolution output (un-pooled)
  int64_t ph, pw;            // pooled output
};

inline ConvPoolShape check_conv_relu_maxpool2d_args(
    const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, c10::IntArrayRef padding,
    int64_t pool) {
  const char* op = "conv_relu_maxpool2d";
  TORCH_CHECK_VALUE(input.dim() == 4, op,
      ": expected input to be a 4-D tensor [N, C_in, H, W], got a ",
      input.dim(), "-D tensor");
  TORCH_CHECK_VALUE(weight.dim() == 4, op,
      ": expected weight to be a 4-D tensor [C_out, C_in, kH, kW], got a ",
      weight.dim(), "-D tensor");
  TORCH_CHECK_TYPE(input.scalar_type() == at::kFloat ||
                   input.scalar_type() == at::kDouble, op,
      ": expected input to be float32 or float64, got ", input.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op,
      ": expected weight to have the dtype of input (", input.scalar_type(),
      "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(input.device() == weight.device(), op,
      ": expected input and weight on the same device, got input on ",
      input.device(), " and weight on ", weight.device());
  TORCH_CHECK_VALUE(padding.size() == 2, op,
      ": expected padding to have 2 elements (pad_h, pad_w), got ",
      padding.size());
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op,
      ": expected padding to be non-negative, got (", padding[0], ", ",
      padding[1], ")");
  TORCH_CHECK_VALUE(pool >= 1, op, ": expected pool >= 1, got ", pool);

  ConvPoolShape s;
  s.n = input.size(0); s.cin = input.size(1); s.h = input.size(2); s.w = input.size(3);
  s.cout = weight.size(0); s.kh = weight.size(2); s.kw = weight.size(3);
  s.pad_h = padding[0]; s.pad_w = padding[1]; s.pool = pool;
  TORCH_CHECK_VALUE(weight.size(1) == s.cin, op,
      ": expected weight.size(1) (in-channels) to equal input.size(1) = ",
      s.cin, ", got ", weight.size(1));
  TORCH_CHECK_VALUE(s.kh >= 1 && s.kw >= 1, op,
      ": expected a kernel of at least 1x1, got weight of spatial size ",
      s.kh, "x", s.kw);
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == s.cout, op,
        ": expected bias to be a 1-D tensor of length C_out = ", s.cout,
        ", got shape ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op,
        ": expected bias to have the dtype of input (", input.scalar_type(),
        "), got ", b.scalar_type());
    TORCH_CHECK_VALUE(b.device() == input.device(), op,
        ": expected bias on the device of input (", input.device(),
        "), got ", b.device());
  }
  TORCH_CHECK_VALUE(s.h + 2 * s.pad_h >= s.kh && s.w + 2 * s.pad_w >= s.kw, op,
      ": kernel size ", s.kh, "x", s.kw, " is larger than the padded input ",
      s.h + 2 * s.pad_h, "x", s.w + 2 * s.pad_w);
  s.oh = conv_out_size(s.h, s.kh, s.pad_h);
  s.ow = conv_out_size(s.w, s.kw, s.pad_w);
  TORCH_CHECK_VALUE(pool <= s.oh && pool <= s.ow, op,
      ": pool window ", pool, " is larger than the convolution output ",
      s.oh, "x", s.ow);
  s.ph = pool_out_size(s.oh, pool);
  s.pw = pool_out_size(s.ow, pool);
  return s;
}

// dtype of the saved winner indices for a pool window.
inline at::ScalarType index_dtype_for_pool(int64_t pool) {
  return pool <= kMaxPoolForUint8Index ? at::kByte : at::kInt;
}

// Calls f with a value of the C++ index type used for this pool size
// (uint8_t or int32_t), for the kernels' template dispatch.
template <typename F>
void dispatch_index_type(int64_t pool, F&& f) {
  if (index_dtype_for_pool(pool) == at::kByte) {
    f(uint8_t{});
  } else {
    f(int32_t{});
  }
}

inline void check_backward_args(const at::Tensor& grad_output,
                                const at::Tensor& indices,
                                const ConvPoolShape& s,
                                const at::Tensor& input) {
  const char* op = "_conv_relu_maxpool2d_backward";
  TORCH_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == s.n &&
                    grad_output.size(1) == s.cout &&
                    grad_output.size(2) == s.ph && grad_output.size(3) == s.pw,
      op, ": expected grad_output of shape [", s.n, ", ", s.cout, ", ", s.ph,
      ", ", s.pw, "], got ", grad_output.sizes());
  TORCH_CHECK_VALUE(indices.sizes() == grad_output.sizes(), op,
      ": expected indices of shape ", grad_output.sizes(), ", got ",
      indices.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == index_dtype_for_pool(s.pool), op,
      ": expected indices of dtype ", index_dtype_for_pool(s.pool), ", got ",
      indices.scalar_type());
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op,
      ": expected grad_output to have the dtype of input (",
      input.scalar_type(), "), got ", grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == input.device() &&
                    indices.device() == input.device(), op,
      ": expected grad_output and indices on the device of input (",
      input.device(), ")");
}

}  // namespace fmnist_ext
