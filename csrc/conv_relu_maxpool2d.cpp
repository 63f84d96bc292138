// The schema of the fused operator, declared once for every backend.
//
//   conv_relu_maxpool2d(input, weight, bias, padding, pool) -> (out, indices)
//     out     = max_pool2d(relu(conv2d(input, weight, bias, padding)), pool, pool)
//     indices = winner of each pool window (see index_math.h), the compact
//               state the backward needs; uint8 for pool <= 15, int32 above.
//
//   _conv_relu_maxpool2d_backward(grad_output, input, weight, indices,
//                                 padding, pool, output_mask)
//     -> (grad_input, grad_weight, grad_bias)
//     Entries whose output_mask is false are returned as empty tensors and
//     not computed (the first layer of a network needs no grad_input).
//
// Kernels are registered per dispatch key in cpu/ and cuda/; the fake,
// Autograd and Autocast kernels live in fmnist_ext/op/fused_conv.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fmnist_ext, m) {
  m.def(
      "conv_relu_maxpool2d(Tensor input, Tensor weight, Tensor? bias, "
      "int[2] padding, int pool) -> (Tensor, Tensor)");
  m.def(
      "_conv_relu_maxpool2d_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor indices, int[2] padding, int pool, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
