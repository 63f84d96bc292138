// What the host code takes from PyTorch: the LibTorch stable ABI only
// (torch/csrc/stable, torch/headeronly), so that one build against the oldest
// supported torch (TORCH_TARGET_VERSION, set by CMakeLists.txt) loads into
// every later one. Plus the few helpers the checks and entry points share:
// errors that keep their Python type, printing of dtypes, devices and shapes
// as torch prints them, and the float32/float64 dispatch.
//
// Errors. Only the message of a C++ exception crosses the stable ABI: torch
// turns it into a RuntimeError (c10::ValueError / c10::TypeError, which
// become ValueError / TypeError, are not part of the stable ABI). So the
// checks throw std::runtime_error whose message starts with "ValueError: " or
// "TypeError: ", and the ops' Python Autograd kernels, which every ordinary
// call passes (fmnist_ext/op/_dispatch.py), raise the Python exception of
// that name with the rest of the message. A call that skips them (under
// torch.inference_mode) sees the RuntimeError with the same message.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fmnist_ext {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace detail {

template <typename... A>
[[noreturn]] void fail(const char* tag, const A&... parts) {
  std::ostringstream message;
  message << tag;
  (message << ... << parts);
  throw std::runtime_error(message.str());
}

}  // namespace detail

// FMNIST_CHECK_VALUE / FMNIST_CHECK_TYPE / FMNIST_CHECK(cond, message parts...):
// ValueError / TypeError / RuntimeError in Python when cond is false.
#define FMNIST_CHECK_VALUE(cond, ...)                                     \
  do {                                                                    \
    if (!(cond)) ::fmnist_ext::detail::fail("ValueError: ", __VA_ARGS__); \
  } while (0)
#define FMNIST_CHECK_TYPE(cond, ...)                                     \
  do {                                                                   \
    if (!(cond)) ::fmnist_ext::detail::fail("TypeError: ", __VA_ARGS__); \
  } while (0)
#define FMNIST_CHECK(cond, ...)                               \
  do {                                                        \
    if (!(cond)) ::fmnist_ext::detail::fail("", __VA_ARGS__); \
  } while (0)

// A device as torch prints it: cpu, cuda:0, meta.
struct DeviceName {
  torch::stable::Device device;
};

inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  switch (d.device.type()) {
    case torch::headeronly::DeviceType::CPU: out << "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: out << "cuda"; break;
    case torch::headeronly::DeviceType::Meta: out << "meta"; break;
    default: out << "device type " << static_cast<int>(d.device.type()); break;
  }
  if (d.device.has_index()) out << ":" << static_cast<int>(d.device.index());
  return out;
}

inline DeviceName device_of(const Tensor& t) { return DeviceName{t.device()}; }

// A shape as torch prints it: [2, 3, 5].
struct Shape {
  torch::headeronly::IntHeaderOnlyArrayRef sizes;
};

inline std::ostream& operator<<(std::ostream& out, const Shape& s) {
  out << "[";
  for (size_t i = 0; i < s.sizes.size(); ++i) out << (i ? ", " : "") << s.sizes[i];
  return out << "]";
}

inline Shape shape_of(const Tensor& t) { return Shape{t.sizes()}; }

inline bool same_shape(const Tensor& a, const Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != b.size(d)) return false;
  }
  return true;
}

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

// Calls f(T{}) with T = float or double for the dtype `t` (the callers have
// checked it is one of them).
template <typename F>
void dispatch_floating(ScalarType t, const char* op, F&& f) {
  if (t == ScalarType::Float) {
    f(float{});
  } else if (t == ScalarType::Double) {
    f(double{});
  } else {
    detail::fail("TypeError: ", op, ": expected float32 or float64, got ", t);
  }
}

// The ScalarType of a C++ element type.
template <typename T>
constexpr ScalarType scalar_type_of();
template <>
constexpr ScalarType scalar_type_of<float>() {
  return ScalarType::Float;
}
template <>
constexpr ScalarType scalar_type_of<double>() {
  return ScalarType::Double;
}
template <>
constexpr ScalarType scalar_type_of<uint8_t>() {
  return ScalarType::Byte;
}
template <>
constexpr ScalarType scalar_type_of<int32_t>() {
  return ScalarType::Int;
}

// A new contiguous tensor of `sizes` and `dtype` (default: like's) on `like`'s
// device: one direct C shim call (aoti_torch_empty_strided, no trip through
// the boxed dispatcher), as at::empty was before.
inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                       ScalarType dtype) {
  const int64_t ndim = static_cast<int64_t>(sizes.size());
  int64_t strides[8];
  FMNIST_CHECK(ndim <= 8, "fmnist_ext: internal error: a tensor of more than 8 dims");
  int64_t stride = 1;
  for (int64_t d = ndim - 1; d >= 0; --d) {
    strides[d] = stride;
    stride *= sizes[d] > 1 ? sizes[d] : 1;
  }
  int32_t device_type = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  const int32_t shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(ndim, sizes.data(), strides, shim_dtype,
                                                  device_type, like.get_device_index(), &out));
  return Tensor(out);
}
inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  return empty_on(like, sizes, like.scalar_type());
}
inline Tensor zeros_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                       ScalarType dtype) {
  Tensor t = empty_on(like, sizes, dtype);
  torch::stable::zero_(t);
  return t;
}
inline Tensor zeros_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes) {
  return zeros_on(like, sizes, like.scalar_type());
}

// t itself when it is contiguous (a cheap C shim query, as at::Tensor::contiguous
// asks first), else a contiguous copy (torch's aten::contiguous).
inline Tensor contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

}  // namespace fmnist_ext
