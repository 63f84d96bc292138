// Host emulation of the CUDA kernels of conv_relu_maxpool2d.
//
// Runs the block phases of csrc/cuda/kernels.cuh with the launch plans of
// csrc/cuda/plan.h on the CPU (block by block; all threads of a phase, then
// the next phase, which is what __syncthreads guarantees), for a grid of
// shapes, and compares with a naive reference. Inputs and weights are small
// dyadic numbers, so every sum is exact in float and double whatever the
// order: the comparison is exact, and ties between window positions are
// frequent (the first maximum in scan order must win). NaNs are injected in
// some cases. Each block's shared memory is a heap buffer of exactly the
// planned size, so AddressSanitizer (-fsanitize=address) reports any access
// outside the plan.
//
// Built and run by tests/test_cuda.py::test_cuda_kernels_host_emulation when
// nvcc is available (no GPU needed):
//   nvcc -std=c++17 -O1 -x cu -Icsrc emulate.cu -o emulate && ./emulate
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/plan.h"

using namespace fmnist_ext;
using namespace fmnist_ext::cuda;

namespace {

int g_failures = 0;

struct Case {
  int64_t n;
  int cin, h, w, cout, kh, kw, ph_, pw_, pool;
  int pad_h, pad_w;
  bool bias;
  int sms;
  bool nans;
};

template <typename T>
bool same(T a, T b) {
  return (std::isnan(a) && std::isnan(b)) || a == b;
}

struct Buf {  // exactly-sized, individually allocated shared-memory stand-in
  unsigned char* p;
  explicit Buf(size_t n) : p(static_cast<unsigned char*>(std::malloc(n ? n : 1))) {}
  ~Buf() { std::free(p); }
};

template <typename T, typename I>
void run_case(const Case& c, std::mt19937& rng) {
  const int64_t oh = c.h + 2 * c.pad_h - c.kh + 1, ow = c.w + 2 * c.pad_w - c.kw + 1;
  if (oh < c.pool || ow < c.pool) return;
  const int64_t ph = oh / c.pool, pw = ow / c.pool;
  const Geom g = make_geom(c.n, c.cin, c.h, c.w, c.cout, c.kh, c.kw, c.pad_h, c.pad_w,
                           c.pool, ph, pw);
  std::uniform_int_distribution<int> d(-4, 4);
  std::vector<T> x(c.n * c.cin * c.h * c.w), wt(int64_t(c.cout) * c.cin * c.kh * c.kw),
      b(c.cout);
  for (auto& v : x) v = T(d(rng)) / T(4);
  for (auto& v : wt) v = T(d(rng)) / T(4);
  for (auto& v : b) v = T(d(rng)) / T(8);
  if (c.nans) {
    for (int k = 0; k < 3 && !x.empty(); ++k) x[rng() % x.size()] = NAN;
  }
  const int64_t cells = ph * pw;
  const int64_t nout = c.n * c.cout * cells;
  const T* bp = c.bias ? b.data() : nullptr;

  // Naive reference: conv (double), relu, pool scan (index_math rules).
  std::vector<T> ref_out(nout);
  std::vector<int32_t> ref_idx(nout);
  for (int64_t n = 0; n < c.n; ++n)
    for (int co = 0; co < c.cout; ++co)
      for (int64_t p = 0; p < ph; ++p)
        for (int64_t q = 0; q < pw; ++q) {
          T best = -INFINITY;
          int32_t bj = 0;
          for (int r = 0; r < c.pool; ++r)
            for (int s = 0; s < c.pool; ++s) {
              double acc = bp ? bp[co] : 0.0;
              for (int ci = 0; ci < c.cin; ++ci)
                for (int i = 0; i < c.kh; ++i)
                  for (int j = 0; j < c.kw; ++j) {
                    const int64_t y = p * c.pool + r + i - c.pad_h, xx = q * c.pool + s + j - c.pad_w;
                    if (y < 0 || y >= c.h || xx < 0 || xx >= c.w) continue;
                    acc += double(wt[((co * c.cin + ci) * c.kh + i) * c.kw + j]) *
                           double(x[((n * c.cin + ci) * c.h + y) * c.w + xx]);
                  }
              const T v = T(acc);
              if (pool_takes(v, best)) { best = v; bj = r * c.pool + s; }
            }
          const int64_t o = ((n * c.cout + co) * ph + p) * pw + q;
          ref_out[o] = pool_output(best);
          ref_idx[o] = pool_saved_index(best, bj, c.pool);
        }
  std::vector<T> go(nout);
  for (auto& v : go) v = T(d(rng)) / T(2);
  std::vector<T> ref_gi(x.size(), T(0)), ref_gw(wt.size(), T(0)), ref_gb(c.cout, T(0));
  for (int64_t n = 0; n < c.n; ++n)
    for (int co = 0; co < c.cout; ++co)
      for (int64_t k = 0; k < cells; ++k) {
        const int64_t o = (n * c.cout + co) * cells + k;
        const int32_t j = ref_idx[o];
        if (j == no_grad_index(c.pool)) continue;
        const int64_t r0 = winner_row(k / pw, j, c.pool), c0 = winner_col(k % pw, j, c.pool);
        ref_gb[co] += go[o];
        for (int ci = 0; ci < c.cin; ++ci)
          for (int i = 0; i < c.kh; ++i)
            for (int jj = 0; jj < c.kw; ++jj) {
              const int64_t y = r0 + i - c.pad_h, xx = c0 + jj - c.pad_w;
              if (y < 0 || y >= c.h || xx < 0 || xx >= c.w) continue;
              const int64_t xi = ((n * c.cin + ci) * c.h + y) * c.w + xx;
              const int64_t wi = ((co * c.cin + ci) * c.kh + i) * c.kw + jj;
              ref_gw[wi] += go[o] * x[xi];
              ref_gi[xi] += go[o] * wt[wi];
            }
      }

  char name[256];
  std::snprintf(name, sizeof(name),
                "%s/%s n=%lld cin=%d %dx%d cout=%d k=%dx%d pad=%d,%d pool=%d bias=%d sms=%d nan=%d",
                sizeof(T) == 4 ? "f32" : "f64", sizeof(I) == 1 ? "u8" : "i32",
                (long long)c.n, c.cin, c.h, c.w, c.cout, c.kh, c.kw, c.pad_h, c.pad_w, c.pool,
                int(c.bias), c.sms, int(c.nans));
  auto fail = [&](const char* what, int64_t at) {
    if (g_failures < 30) std::printf("FAIL %s: %s at %lld\n", name, what, (long long)at);
    ++g_failures;
  };

  for (int direct = 0; direct < 2; ++direct) {
    // ---- forward
    std::vector<T> out(nout, T(-7));
    std::vector<I> idx(nout, I(77));
    FwdPlan fp = plan_forward(g, sizeof(T), c.sms);
    const bool fwd_fast = fp.fast && !direct;
    FwdArgs<T, I> fa{g, x.data(), wt.data(), bp, out.data(), idx.data(), fp.imgs, fp.cgp};
    if (fwd_fast) {
      if (fp.threads % 32 || fp.threads > kMaxThreads || fp.smem > kSmemBudget) fail("fwd plan", 0);
      for (int by = 0; by < fp.groups; ++by)
        for (int64_t bx = 0; bx < fp.blocks; ++bx) {
          Buf sm(fp.smem);
          T* s = reinterpret_cast<T*>(sm.p);
          for (int t = 0; t < fp.threads; ++t) fwd_stage(fa, bx, by, s, t, fp.threads);
          for (int t = 0; t < fp.threads; ++t) {
            if (std::is_same_v<I, uint8_t> && c.pool == 2) {
              fwd_work<T, T, I, 2>(fa, bx, by, s, t, fp.threads);
            } else {
              fwd_work<T, T, I, 0>(fa, bx, by, s, t, fp.threads);
            }
          }
        }
    } else {
      for (int64_t o = 0; o < nout; ++o) fwd_direct_item<T, T, I>(fa, o);
    }
    for (int64_t o = 0; o < nout; ++o) {
      if (!same(out[o], ref_out[o])) { fail(direct ? "direct out" : "fast out", o); break; }
      if (int32_t(idx[o]) != ref_idx[o]) { fail(direct ? "direct idx" : "fast idx", o); break; }
    }

    // ---- backward (from the reference indices), all three outputs
    std::vector<I> ridx(nout);
    for (int64_t o = 0; o < nout; ++o) ridx[o] = I(ref_idx[o]);
    std::vector<T> gi(x.size(), T(-9)), gw(wt.size(), T(0)), gb(c.cout, T(0));
    BwdInputPlan ip = plan_backward_input(g, sizeof(T), c.sms);
    BwdInputArgs<T, I> ia{g, wt.data(), go.data(), ridx.data(), gi.data(), ip.imgs, ip.cinp};
    if (ip.fast && !direct) {
      if (ip.threads % 32 || ip.threads > kMaxThreads || ip.smem > kSmemBudget) fail("bwd input plan", 0);
      for (int64_t bx = 0; bx < ip.blocks; ++bx) {
        Buf sm(ip.smem);
        for (int t = 0; t < ip.threads; ++t) bwd_input_stage(ia, bx, sm.p, t, ip.threads);
        for (int t = 0; t < ip.threads; ++t) {
          if (ip.cb == 1) bwd_input_work<T, T, I, 1>(ia, bx, sm.p, t, ip.threads);
          else bwd_input_work<T, T, I, kCib>(ia, bx, sm.p, t, ip.threads);
        }
      }
    } else {
      for (int64_t e = 0; e < int64_t(gi.size()); ++e) bwd_input_direct_item<T, T, I>(ia, e);
    }
    for (size_t e = 0; e < gi.size(); ++e)
      if (!same(gi[e], ref_gi[e])) { fail(direct ? "direct grad_input" : "fast grad_input", e); break; }

    BwdWeightPlan wp = plan_backward_weight(g, sizeof(T), sizeof(T), c.sms);
    BwdWeightArgs<T, I> wa{g, x.data(), go.data(), ridx.data(), gw.data(), gb.data(),
                           wp.imgs, wp.slices, wp.chunks};
    if (wp.fast && !direct) {
      if (wp.threads % 32 || wp.threads > kMaxThreads || wp.smem > kSmemBudget) fail("bwd weight plan", 0);
      for (int64_t bx = 0; bx < wp.blocks; ++bx) {
        Buf sm(wp.smem);
        for (int t = 0; t < wp.threads; ++t) bwd_weight_init<T, T, I>(wa, sm.p, t, wp.threads);
        for (int64_t ch = bx; ch < wp.chunks; ch += wp.blocks) {
          for (int t = 0; t < wp.threads; ++t) bwd_weight_stage<T, T, I>(wa, ch, sm.p, t, wp.threads);
          for (int t = 0; t < wp.threads; ++t) bwd_weight_accumulate<T, T, I>(wa, sm.p, t, wp.threads);
        }
        for (int t = 0; t < wp.threads; ++t) bwd_weight_flush<T, T, I>(wa, sm.p, t, wp.threads);
      }
    } else {
      const int64_t total = int64_t(bwd_weight_elems(g)) * wp.slices;
      for (int64_t se = 0; se < total; ++se) bwd_weight_direct_item<T, T, I>(wa, se);
    }
    for (size_t e = 0; e < gw.size(); ++e)
      if (!same(gw[e], ref_gw[e])) { fail(direct ? "direct grad_weight" : "fast grad_weight", e); break; }
    for (size_t e = 0; e < gb.size(); ++e)
      if (!same(gb[e], ref_gb[e])) { fail(direct ? "direct grad_bias" : "fast grad_bias", e); break; }
    if (direct == 0 && !(fp.fast && ip.fast && wp.fast) && g_failures == 0 && std::getenv("EMU_VERBOSE")) {
      std::printf("note: %s uses a direct path (fwd %d in %d w %d)\n", name, fp.fast, ip.fast, wp.fast);
    }
  }
}

template <typename T>
void run(const Case& c, std::mt19937& rng) {
  if (c.pool <= kMaxPoolForUint8Index) run_case<T, uint8_t>(c, rng);
  else run_case<T, int32_t>(c, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int cases = 0;
  std::vector<Case> fixed = {
      // the two seed blocks of the model, several batch sizes and SM counts
      {1, 1, 28, 28, 6, 5, 5, 0, 0, 2, 0, 0, true, 132, false},
      {64, 1, 28, 28, 6, 5, 5, 0, 0, 2, 0, 0, true, 132, false},
      {300, 1, 28, 28, 6, 5, 5, 0, 0, 2, 0, 0, true, 4, false},
      {1, 6, 12, 12, 12, 5, 5, 0, 0, 2, 0, 0, true, 132, false},
      {64, 6, 12, 12, 12, 5, 5, 0, 0, 2, 0, 0, true, 132, false},
      {300, 6, 12, 12, 12, 5, 5, 0, 0, 2, 0, 0, false, 2, false},
      {5, 1, 28, 28, 6, 5, 5, 0, 0, 2, 2, 2, true, 132, true},
      // pool > 15 (int32 indices), pool 1, 3
      {3, 2, 20, 19, 3, 3, 2, 0, 0, 16, 1, 1, true, 8, false},
      {4, 3, 9, 7, 5, 2, 3, 0, 0, 1, 1, 0, true, 8, false},
      {4, 3, 11, 13, 7, 3, 3, 0, 0, 3, 0, 2, false, 8, false},
      // too large for the shared-memory fast paths: the direct kernels
      {2, 16, 40, 40, 8, 3, 3, 0, 0, 2, 1, 1, true, 132, false},
      {1, 64, 9, 9, 64, 3, 3, 0, 0, 2, 0, 0, true, 132, false},
  };
  for (const Case& c : fixed) {
    run<float>(c, rng);
    run<double>(c, rng);
    ++cases;
  }
  const int pools[] = {1, 2, 2, 2, 3, 4};
  for (int k = 0; k < 300; ++k) {
    Case c;
    c.n = 1 + rng() % 9;
    c.cin = 1 + rng() % 7;
    c.cout = 1 + rng() % 13;
    c.kh = 1 + rng() % 5;
    c.kw = 1 + rng() % 5;
    c.pool = pools[rng() % 6];
    c.pad_h = rng() % 3;
    c.pad_w = rng() % 3;
    c.h = 1 + rng() % 16;
    c.w = 1 + rng() % 16;
    c.bias = rng() % 4 != 0;
    c.sms = (rng() % 2) ? 1 + rng() % 8 : 132;
    c.nans = rng() % 8 == 0;
    if (rng() % 2) run<float>(c, rng); else run<double>(c, rng);
    ++cases;
  }
  std::printf("%d cases, %d failures\n", cases, g_failures);
  return g_failures == 0 ? 0 : 1;
}
