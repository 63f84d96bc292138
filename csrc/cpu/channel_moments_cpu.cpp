// CPU kernels of fmnist_ext::channel_moments and its backward (schema and
// meaning: csrc/channel_moments.cpp).
//
// Forward, parallel decomposition: the batch is cut into fixed chunks of
// images (their size depends only on the shape, never on the thread count),
// torch::stable::parallel_for hands chunks to threads, and each chunk writes its own
// float64 partial sums [2, C]; the partials are then added in chunk order.
// So the result is deterministic and the same for any number of threads.
// Each channel's values are shifted by the channel's first value before they
// are summed (sum of d and of d^2, d = x - x[0, c]; per plane in two passes,
// see accumulate_plane): with float64 sums this keeps E[d^2] - E[d]^2 free
// of the cancellation that E[x^2] - E[x]^2 has when the mean is large
// against the spread.
// Memory traffic: one read of x (plus a copy first if x is not contiguous);
// the writes are the tiny partial sums.
//
// Backward, parallel decomposition: torch::stable::parallel_for over images; each
// element is grad_x = (x - mean_c) * alpha_c + g_c with alpha_c = 2 grad_var_c
// / M and g_c = grad_mean_c / M. Memory traffic: one read of x, one write of
// grad_x (the _add_ form: one read of x, a read and write of grad_x, and no
// new full-size buffer).
#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "../stable_api.h"

namespace fmnist_ext {
namespace cpu {
namespace {

constexpr const char* kOp = "channel_moments";
constexpr const char* kBackwardOp = "_channel_moments_backward";

// Elements (of all channels) per forward chunk and per backward grain: large
// enough that a chunk's bookkeeping is noise, small enough to load-balance.
constexpr int64_t kChunkElements = 16384;

// Checks x (messages name the argument) and returns (N, C, S): S = H * W
// for a 4-D x, 1 for a 2-D one.
std::tuple<int64_t, int64_t, int64_t> check_x(const Tensor& x, const char* op) {
  FMNIST_CHECK_VALUE(x.dim() == 2 || x.dim() == 4, op,
                     ": expected x to be a 2-D [N, C] or 4-D [N, C, H, W] tensor, got a ", x.dim(),
                     "-D tensor");
  FMNIST_CHECK_TYPE(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double,
                    op, ": expected x to be float32 or float64, got ", x.scalar_type());
  FMNIST_CHECK_VALUE(x.is_cpu(), op, ": expected x on the CPU (this is the CPU kernel), got ",
                     device_of(x));
  const int64_t s = x.dim() == 4 ? x.size(2) * x.size(3) : 1;
  return {x.size(0), x.size(1), s};
}

// A per-channel vector argument: 1-D, length C, x's dtype, on the CPU.
void check_channel_vector(const Tensor& t, const Tensor& x, int64_t c, const char* name) {
  FMNIST_CHECK_VALUE(t.dim() == 1 && t.size(0) == c, kBackwardOp, ": expected ", name,
                     " to be a 1-D tensor of length C = ", c, ", got shape ", shape_of(t));
  FMNIST_CHECK_TYPE(t.scalar_type() == x.scalar_type(), kBackwardOp, ": expected ", name,
                    " to have the dtype of x (", x.scalar_type(), "), got ", t.scalar_type());
  FMNIST_CHECK_VALUE(t.is_cpu(), kBackwardOp, ": expected ", name, " on the CPU, got ",
                     device_of(t));
}

int64_t images_per_chunk(int64_t c, int64_t s) {
  return std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, c * s));
}

// sum += sum_i (p[i] - k), sq += sum_i (p[i] - k)^2 over one channel plane
// of s values, in two passes over the plane (it is in L1 by then): its mean
// pm, then sum (p[i] - pm)^2, both in x's own type with eight independent
// lanes (the compiler vectorizes them without reordering any one sum, no
// -ffast-math; float lanes are twice as wide as double ones). Only 18-odd
// values go into each float lane of a 144-value plane, so a lane's rounding
// stays near float's epsilon; planes are then combined in float64 exactly as
// sum (p - k)^2 = sum (p - pm)^2 + 2 (pm - k) sum (p - pm) + s (pm - k)^2.
template <typename T>
void accumulate_plane(const T* p, int64_t s, double k, double& sum, double& sq) {
  constexpr int kLanes = 8;
  T ls[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= s; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) ls[l] += p[i + l];
  }
  double psum = 0;
  for (; i < s; ++i) psum += static_cast<double>(p[i]);
  for (int l = 0; l < kLanes; ++l) psum += static_cast<double>(ls[l]);
  const T pm = static_cast<T>(psum / static_cast<double>(s));

  T lq[kLanes] = {};
  i = 0;
  for (; i + kLanes <= s; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T d = p[i + l] - pm;
      lq[l] += d * d;
    }
  }
  double m2 = 0;
  for (; i < s; ++i) {
    const double d = static_cast<double>(p[i]) - static_cast<double>(pm);
    m2 += d * d;
  }
  for (int l = 0; l < kLanes; ++l) m2 += static_cast<double>(lq[l]);

  const double ds = static_cast<double>(s), dpm = static_cast<double>(pm);
  const double off = dpm - k;  // plane mean (as rounded) against the channel's shift
  sum += psum - ds * k;
  sq += m2 + 2.0 * off * (psum - ds * dpm) + ds * off * off;
}

// Partial sums of images [n0, n1) into part[0..c) (sums) and part[c..2c)
// (sums of squares), shifted by k[c].
template <typename T>
void moments_chunk(const T* x, int64_t n0, int64_t n1, int64_t c, int64_t s, const double* k,
                   double* part) {
  double* sum = part;
  double* sq = part + c;
  for (int64_t n = n0; n < n1; ++n) {
    const T* xn = x + n * c * s;
    if (s == 1) {  // [N, C]: one value per channel per image; vectorizes over channels
      for (int64_t ch = 0; ch < c; ++ch) {
        const double d = static_cast<double>(xn[ch]) - k[ch];
        sum[ch] += d;
        sq[ch] += d * d;
      }
    } else {
      for (int64_t ch = 0; ch < c; ++ch) accumulate_plane(xn + ch * s, s, k[ch], sum[ch], sq[ch]);
    }
  }
}

std::tuple<Tensor, Tensor> channel_moments_cpu(const Tensor& x_in) {
  const auto [n, c, s] = check_x(x_in, kOp);
  const Tensor x = fmnist_ext::contiguous(x_in);
  const int64_t m = n * s;
  Tensor mean = empty_on(x, {c}), var = empty_on(x, {c});
  if (c == 0) return {mean, var};
  if (m == 0) {  // no values: NaN, like torch.var_mean
    torch::stable::fill_(mean, std::numeric_limits<double>::quiet_NaN());
    torch::stable::fill_(var, std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  const int64_t per = images_per_chunk(c, s);
  const int64_t chunks = (n + per - 1) / per;
  // One row of float64 partial sums per chunk: [chunks, 2 * C].
  Tensor parts = zeros_on(x, {chunks, 2 * c}, ScalarType::Double);
  std::vector<double> k(static_cast<size_t>(c));

  dispatch_floating(x.scalar_type(), kOp, [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // The shift: each channel's first value (image 0, position 0).
    for (int64_t ch = 0; ch < c; ++ch) k[ch] = static_cast<double>(xp[ch * s]);
    const double* kp = k.data();
    double* pp = parts.mutable_data_ptr<double>();
    torch::stable::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t q = k0; q < k1; ++q) {
        moments_chunk(xp, q * per, std::min(n, (q + 1) * per), c, s, kp, pp + q * 2 * c);
      }
    });

    // Chunk order, one channel at a time: deterministic.
    const double* cp = parts.const_data_ptr<double>();
    scalar_t* mp = mean.mutable_data_ptr<scalar_t>();
    scalar_t* vp = var.mutable_data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < c; ++ch) {
      double sum = 0, sq = 0;
      for (int64_t q = 0; q < chunks; ++q) {
        sum += cp[q * 2 * c + ch];
        sq += cp[q * 2 * c + c + ch];
      }
      const double dmean = sum / static_cast<double>(m);
      mp[ch] = static_cast<scalar_t>(kp[ch] + dmean);
      // A NaN/inf input makes this NaN, as it should; std::max would drop a NaN.
      const double v = sq / static_cast<double>(m) - dmean * dmean;
      vp[ch] = static_cast<scalar_t>(v < 0 ? 0.0 : v);
    }
  });
  return {mean, var};
}

// grad_x = (x - mean) * alpha + g per channel, or grad_x += that when Add.
template <bool Add, typename T>
void moments_backward_images(const T* x, int64_t n0, int64_t n1, int64_t c, int64_t s,
                             const T* mean, const T* alpha, const T* g, T* gx) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* xn = x + n * c * s;
    T* gn = gx + n * c * s;
    if (s == 1) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const T v = (xn[ch] - mean[ch]) * alpha[ch] + g[ch];
        gn[ch] = Add ? gn[ch] + v : v;
      }
    } else {
      for (int64_t ch = 0; ch < c; ++ch) {
        const T mu = mean[ch], a = alpha[ch], b = g[ch];
        const T* p = xn + ch * s;
        T* q = gn + ch * s;
        for (int64_t i = 0; i < s; ++i) {
          const T v = (p[i] - mu) * a + b;
          q[i] = Add ? q[i] + v : v;
        }
      }
    }
  }
}

// Checks the backward's arguments; returns (N, C, S).
std::tuple<int64_t, int64_t, int64_t> check_backward(const std::optional<Tensor>& grad_mean,
                                                     const std::optional<Tensor>& grad_var,
                                                     const Tensor& x, const Tensor& mean) {
  const auto shape = check_x(x, kBackwardOp);
  const int64_t c = std::get<1>(shape);
  check_channel_vector(mean, x, c, "mean");
  if (grad_mean.has_value() && grad_mean->defined())
    check_channel_vector(*grad_mean, x, c, "grad_mean");
  if (grad_var.has_value() && grad_var->defined())
    check_channel_vector(*grad_var, x, c, "grad_var");
  return shape;
}

// coef[c] = scale * v[c] computed in float64 and rounded once to T (zeros
// when v is absent).
template <typename T>
std::vector<T> coefficients(const std::optional<Tensor>& v, int64_t c, double scale) {
  std::vector<T> out(static_cast<size_t>(c), T(0));
  if (!(v.has_value() && v->defined())) return out;
  const Tensor vc = fmnist_ext::contiguous(*v);
  const T* p = vc.const_data_ptr<T>();
  for (int64_t ch = 0; ch < c; ++ch) {
    out[ch] = static_cast<T>(static_cast<double>(p[ch]) * scale);
  }
  return out;
}

// out (contiguous, x's shape) = or += the backward formula.
template <bool Add>
void run_backward(const std::optional<Tensor>& grad_mean, const std::optional<Tensor>& grad_var,
                  const Tensor& x_in, const Tensor& mean_in, int64_t n, int64_t c, int64_t s,
                  Tensor& out) {
  if (out.numel() == 0) return;
  const Tensor x = fmnist_ext::contiguous(x_in);
  const Tensor mean = fmnist_ext::contiguous(mean_in);
  // Per-channel coefficients, computed in float64 and rounded once.
  const double inv_m = 1.0 / static_cast<double>(n * s);
  dispatch_floating(x.scalar_type(), kBackwardOp, [&](auto scalar_tag) {
    using scalar_t = decltype(scalar_tag);
    const std::vector<scalar_t> alpha = coefficients<scalar_t>(grad_var, c, 2.0 * inv_m);
    const std::vector<scalar_t> g = coefficients<scalar_t>(grad_mean, c, inv_m);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* mp = mean.const_data_ptr<scalar_t>();
    const scalar_t* ap = alpha.data();
    const scalar_t* gp = g.data();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    torch::stable::parallel_for(0, n, images_per_chunk(c, s), [&](int64_t n0, int64_t n1) {
      moments_backward_images<Add>(xp, n0, n1, c, s, mp, ap, gp, op);
    });
  });
}

Tensor channel_moments_backward_cpu(const std::optional<Tensor>& grad_mean,
                                    const std::optional<Tensor>& grad_var, const Tensor& x,
                                    const Tensor& mean) {
  const auto [n, c, s] = check_backward(grad_mean, grad_var, x, mean);
  Tensor grad_x = empty_on(x, x.sizes());
  run_backward<false>(grad_mean, grad_var, x, mean, n, c, s, grad_x);
  return grad_x;
}

void channel_moments_backward_add_cpu(Tensor grad_x, const std::optional<Tensor>& grad_mean,
                                      const std::optional<Tensor>& grad_var, const Tensor& x,
                                      const Tensor& mean) {
  const auto [n, c, s] = check_backward(grad_mean, grad_var, x, mean);
  FMNIST_CHECK_VALUE(same_shape(grad_x, x), kBackwardOp, "_add_: expected grad_x of x's shape ",
                     shape_of(x), ", got ", shape_of(grad_x));
  FMNIST_CHECK_TYPE(grad_x.scalar_type() == x.scalar_type(), kBackwardOp,
                    "_add_: expected grad_x to have the dtype of x (", x.scalar_type(), "), got ",
                    grad_x.scalar_type());
  FMNIST_CHECK_VALUE(grad_x.is_cpu(), kBackwardOp, "_add_: expected grad_x on the CPU, got ",
                     device_of(grad_x));
  if (grad_x.is_contiguous()) {
    run_backward<true>(grad_mean, grad_var, x, mean, n, c, s, grad_x);
  } else {  // any layout: add through a contiguous copy
    Tensor tmp = fmnist_ext::contiguous(grad_x);
    run_backward<true>(grad_mean, grad_var, x, mean, n, c, s, tmp);
    torch::stable::copy_(grad_x, tmp);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace fmnist_ext

STABLE_TORCH_LIBRARY_IMPL(fmnist_ext, CPU, m) {
  m.impl("channel_moments", TORCH_BOX(&fmnist_ext::cpu::channel_moments_cpu));
  m.impl("_channel_moments_backward", TORCH_BOX(&fmnist_ext::cpu::channel_moments_backward_cpu));
  m.impl("_channel_moments_backward_add_",
         TORCH_BOX(&fmnist_ext::cpu::channel_moments_backward_add_cpu));
}
