// Argument checks shared by every backend of conv_relu_maxpool2d.
//
// The Python API validates the same conditions before it dispatches (so the
// reference path and the fake kernel raise the same errors); these checks
// guard direct callers of torch.ops.fmnist_ext.* so that no input can reach a
// kernel with sizes it cannot handle. Messages name the argument.
#pragma once

#include <optional>
#include <vector>

#include "geometry.h"
#include "index_math.h"
#include "stable_api.h"

namespace fmnist_ext {

// Checks the arguments (messages name the argument) and returns the call's
// geometry.
inline ConvPoolGeometry check_conv_relu_maxpool2d_args(const Tensor& input, const Tensor& weight,
                                                       const std::optional<Tensor>& bias,
                                                       const std::vector<int64_t>& padding,
                                                       int64_t pool) {
  const char* op = "conv_relu_maxpool2d";
  FMNIST_CHECK_VALUE(input.dim() == 4, op,
                     ": expected input to be a 4-D tensor [N, C_in, H, W], got a ", input.dim(),
                     "-D tensor");
  FMNIST_CHECK_VALUE(weight.dim() == 4, op,
                     ": expected weight to be a 4-D tensor [C_out, C_in, kH, kW], got a ",
                     weight.dim(), "-D tensor");
  FMNIST_CHECK_TYPE(
      input.scalar_type() == ScalarType::Float || input.scalar_type() == ScalarType::Double, op,
      ": expected input to be float32 or float64, got ", input.scalar_type());
  FMNIST_CHECK_TYPE(weight.scalar_type() == input.scalar_type(), op,
                    ": expected weight to have the dtype of input (", input.scalar_type(),
                    "), got ", weight.scalar_type());
  FMNIST_CHECK_VALUE(same_device(input, weight), op,
                     ": expected input and weight on the same device, got input on ",
                     device_of(input), " and weight on ", device_of(weight));
  FMNIST_CHECK_VALUE(padding.size() == 2, op,
                     ": expected padding to have 2 elements (pad_h, pad_w), got ", padding.size());
  FMNIST_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, op,
                     ": expected padding to be non-negative, got (", padding[0], ", ", padding[1],
                     ")");
  FMNIST_CHECK_VALUE(pool >= 1, op, ": expected pool >= 1, got ", pool);

  const int64_t n = input.size(0), cin = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t cout = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  const int64_t pad_h = padding[0], pad_w = padding[1];
  FMNIST_CHECK_VALUE(weight.size(1) == cin, op,
                     ": expected weight.size(1) (in-channels) to equal input.size(1) = ", cin,
                     ", got ", weight.size(1));
  FMNIST_CHECK_VALUE(kh >= 1 && kw >= 1, op,
                     ": expected a kernel of at least 1x1, got weight of spatial size ", kh, "x",
                     kw);
  if (bias.has_value() && bias->defined()) {
    const Tensor& b = *bias;
    FMNIST_CHECK_VALUE(b.dim() == 1 && b.size(0) == cout, op,
                       ": expected bias to be a 1-D tensor of length C_out = ", cout,
                       ", got shape ", shape_of(b));
    FMNIST_CHECK_TYPE(b.scalar_type() == input.scalar_type(), op,
                      ": expected bias to have the dtype of input (", input.scalar_type(),
                      "), got ", b.scalar_type());
    FMNIST_CHECK_VALUE(same_device(b, input), op, ": expected bias on the device of input (",
                       device_of(input), "), got ", device_of(b));
  }
  FMNIST_CHECK_VALUE(h + 2 * pad_h >= kh && w + 2 * pad_w >= kw, op, ": kernel size ", kh, "x", kw,
                     " is larger than the padded input ", h + 2 * pad_h, "x", w + 2 * pad_w);
  const ConvPoolGeometry g = make_geometry(n, cin, h, w, cout, kh, kw, pad_h, pad_w, pool);
  FMNIST_CHECK_VALUE(pool <= g.oh && pool <= g.ow, op, ": pool window ", pool,
                     " is larger than the convolution output ", g.oh, "x", g.ow);
  return g;
}

// dtype of the saved winner indices for a pool window.
inline ScalarType index_dtype_for_pool(int64_t pool) {
  return pool <= kMaxPoolForUint8Index ? ScalarType::Byte : ScalarType::Int;
}

// Calls f with a value of the C++ index type used for this pool size
// (uint8_t or int32_t), for the kernels' template dispatch.
template <typename F>
void dispatch_index_type(int64_t pool, F&& f) {
  if (index_dtype_for_pool(pool) == ScalarType::Byte) {
    f(uint8_t{});
  } else {
    f(int32_t{});
  }
}

inline void check_backward_args(const Tensor& grad_output, const Tensor& indices,
                                const ConvPoolGeometry& g, const Tensor& input) {
  const char* op = "_conv_relu_maxpool2d_backward";
  FMNIST_CHECK_VALUE(grad_output.dim() == 4 && grad_output.size(0) == g.n &&
                         grad_output.size(1) == g.cout && grad_output.size(2) == g.ph &&
                         grad_output.size(3) == g.pw,
                     op, ": expected grad_output of shape [", g.n, ", ", g.cout, ", ", g.ph, ", ",
                     g.pw, "], got ", shape_of(grad_output));
  FMNIST_CHECK_VALUE(same_shape(indices, grad_output), op, ": expected indices of shape ",
                     shape_of(grad_output), ", got ", shape_of(indices));
  FMNIST_CHECK_TYPE(indices.scalar_type() == index_dtype_for_pool(g.pool), op,
                    ": expected indices of dtype ", index_dtype_for_pool(g.pool), ", got ",
                    indices.scalar_type());
  FMNIST_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(), op,
                    ": expected grad_output to have the dtype of input (", input.scalar_type(),
                    "), got ", grad_output.scalar_type());
  FMNIST_CHECK_VALUE(same_device(grad_output, input) && same_device(indices, input), op,
                     ": expected grad_output and indices on the device of input (",
                     device_of(input), ")");
}

}  // namespace fmnist_ext
