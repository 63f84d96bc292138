// The CPU forward of fmnist_ext::conv_relu_maxpool2d
// (conv_relu_maxpool2d_kernel.cpp), also called directly by the whole-model
// inference kernel (fashion_cnn_inference_cpu.cpp): the same function the
// dispatcher runs, without a second trip through the dispatcher.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../stable_api.h"

namespace fmnist_ext {
namespace cpu {

std::tuple<Tensor, Tensor> conv_relu_maxpool2d_forward_cpu(const Tensor& input,
                                                           const Tensor& weight,
                                                           const std::optional<Tensor>& bias,
                                                           std::vector<int64_t> padding,
                                                           int64_t pool);

}  // namespace cpu
}  // namespace fmnist_ext
