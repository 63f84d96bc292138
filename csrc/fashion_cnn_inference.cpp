// The schema of the whole-model inference operator, declared once for every
// backend (only a CPU kernel exists: csrc/cpu/fashion_cnn_inference_cpu.cpp).
//
//   fashion_cnn_inference(input, conv1_weight, conv1_bias, conv2_weight,
//                         conv2_bias, fc1_weight, fc1_bias, fc2_weight,
//                         fc2_bias, out_weight, out_bias) -> logits
//     = out(relu(fc2(relu(fc1(flatten(block2(block1(input))))))))
//     block = conv_relu_maxpool2d(., weight, bias, padding=0, pool=2)
//
// The seed CNN's eval-mode forward with both BatchNorm layers already folded
// into the following layer's weights (fmnist_ext/inference.py does the
// folding). One call instead of a dozen: at batch 1 the model's cost is the
// per-operator overhead, not the arithmetic. No autograd: it refuses inputs
// that require gradients while grad mode is on.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY_FRAGMENT(fmnist_ext, m) {
  m.def(
      "fashion_cnn_inference(Tensor input, Tensor conv1_weight, "
      "Tensor conv1_bias, Tensor conv2_weight, Tensor conv2_bias, "
      "Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, "
      "Tensor out_weight, Tensor out_bias) -> Tensor");
}
