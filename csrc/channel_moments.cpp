// The schema of the per-channel moments operator, declared once for every
// backend (only a CPU kernel exists: csrc/cpu/channel_moments_cpu.cpp).
//
//   channel_moments(x) -> (mean, var)
//     x: [N, C] or [N, C, H, W], float32 or float64. mean and var are [C], in
//     x's dtype, over every dim but 1; var is biased (divides by
//     M = N * H * W), i.e. torch.var_mean(x, dims, correction=0). M = 0
//     gives NaN, like torch.var_mean.
//
//   _channel_moments_backward(grad_mean, grad_var, x, mean) -> grad_x
//     grad_x = grad_mean / M + grad_var * 2 (x - mean) / M, per channel;
//     an absent (None) grad_mean or grad_var counts as zero.
//
//   _channel_moments_backward_add_(grad_x, grad_mean, grad_var, x, mean)
//     grad_x += the same, in place: for a caller that sums this gradient with
//     another one of x's (the next layer's) in one pass, without allocating.
//
// Why an op of its own: the FashionCNN's training forward folds BatchNorm2d's
// batch statistics into the next conv block (fmnist_ext/bn_fold.py), which
// leaves the moments as the only full-size BatchNorm work; stock
// nn.BatchNorm2d and torch.var_mean spend several times a memory pass on it.
// The fake kernels and the autograd formula live in fmnist_ext/op/moments.py.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(fmnist_ext, m) {
  m.def("channel_moments(Tensor x) -> (Tensor, Tensor)");
  m.def(
      "_channel_moments_backward(Tensor? grad_mean, Tensor? grad_var, Tensor x, Tensor mean) "
      "-> Tensor");
  m.def(
      "_channel_moments_backward_add_(Tensor(a!) grad_x, Tensor? grad_mean, Tensor? grad_var, "
      "Tensor x, Tensor mean) -> ()");
}
