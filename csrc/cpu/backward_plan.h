// The backward's plan: which path computes grad_weight, whether a winner
// list is gathered and grad_input scattered, and the buffer sizes, chosen
// once per call from the geometry and the gradients asked for
// (plan_backward), like the CUDA side's launch plans (cuda/plan.h).
// backward_images (backward.h) executes it without choosing again. Part of
// one instruction-set build (kernels.h: compiled once per ISA, internal
// linkage, no ATen/c10 headers).
//
// The grad_weight paths (WeightGradPath), first match wins:
//   kFirstLayerPool2, kFirstLayer: one input channel, no grad_input asked
//     for, filter rows of one vector, kh <= kMaxKhTile (the model's block
//     1). No winner list: every window is visited, a window without a winner
//     reading zero rows below the image with g = +0. For pool 2 a vectorized
//     pass decodes the channel's windows first (decode_windows_pool2, whose
//     masked gradients also give grad_bias), otherwise a table decodes each
//     index (weight_grad_cells).
//   kChannelsLastWithInput, kChannelsLast: several input channels (the
//     model's block 2) and a compiled width for the channels-last filter row
//     (nw vectors): the input copied channels last (xcl), summed over the
//     call's images in that layout (gwcl), transposed into the partial at
//     the end. With grad_input asked for and nw in {3, 5, 6}, both in one
//     pass over the winners (weight_and_input_grad).
//   kPlanarTile, kPlanarRows: otherwise, planar rows from the winner list:
//     all kh rows per pass when a row fits one vector and kh <= kMaxKhTile,
//     else row by row.
// grad_input (any path but kChannelsLastWithInput): scatter_input_grad after
// the grad_weight step, from the same winner list.
//
// Memory traffic: the plan itself is a few integers; its sizes are the
// per-call scratch (image buffers of one image, the rearranged filter, the
// channels-last partial sum), all L1/L2-resident for the model's blocks.
#pragma once

#include <cstdint>

#include "backward_kernels.h"
#include "simd.h"

namespace fmnist_ext {
namespace cpu {
namespace FMNIST_ISA {
namespace {

enum class WeightGradPath {
  kNone,                   // grad_weight not asked for
  kFirstLayerPool2,        // decode_windows_pool2 + weight_grad_rows_tile over all windows
  kFirstLayer,             // weight_grad_cells (table decode per window)
  kChannelsLastWithInput,  // weight_and_input_grad: grad_weight and grad_input in one pass
  kChannelsLast,           // weight_grad_cl
  kPlanarTile,             // weight_grad_rows_tile over the winner list
  kPlanarRows,             // weight_grad_row per filter row over the winner list
};

struct BackwardPlan {
  // What is computed, and how.
  WeightGradPath weight = WeightGradPath::kNone;
  bool grad_bias = false;     // masked_grads + lane_sum (from the decode on kFirstLayerPool2)
  bool grad_input = false;    // gxp, copied out to NCHW per image
  bool list = false;          // gather_winners per channel
  bool list_pix = false;      // the list carries each winner's pixel in gxp
  bool scatter = false;       // scatter_input_grad from the list
  bool xp = false;            // planar zero-padded input copy per image
  bool xp_zero_rows = false;  // xp planes have kh zero rows below (the first-layer paths)
  bool xcl = false;           // channels-last input copy and gwcl sums (kChannelsLast*)

  // Geometry of the buffers.
  int64_t pool = 0;
  int64_t cells = 0;    // pool windows per channel (ph * pw)
  int32_t no_grad = 0;  // no_grad_index(pool)
  int64_t nq = 0;       // vectors per planar filter row (grad_weight)
  int64_t kwp = 0;      // padded_kw: filter row stride of the grad_weight partial
  int64_t hp = 0;       // rows of the padded image that reach the pool
  int64_t hpx = 0;      // rows of an xp plane (hp, plus kh zero rows on the first-layer paths)
  int64_t ws = 0;       // xp row length
  int64_t plane = 0;    // xp plane size (hpx * ws)
  int64_t gws = 0;      // gxp / xcl row length in pixels
  int64_t cinp = 0;     // input channels padded to whole vectors
  int64_t nw = 0;       // vectors per channels-last filter row (kw * cinp / L)

  // Scratch sizes, in elements.
  int64_t xp_size = 0, gxp_size = 0, wt_size = 0, xcl_size = 0, gwcl_size = 0;
  int64_t ncode = 0;     // WinnerCode table entries (kFirstLayer)
  int64_t ndecoded = 0;  // window corners + decoded offsets (kFirstLayerPool2)
};

template <typename T>
inline BackwardPlan plan_backward(const ConvPoolGeometry& g, bool need_gw, bool need_gb,
                                  bool need_gi) {
  constexpr int64_t L = vector_lanes<T>();
  BackwardPlan p;
  p.pool = g.pool;
  p.cells = g.ph * g.pw;
  p.no_grad = no_grad_index(g.pool);
  p.nq = ceil_div(g.kw, L);
  p.kwp = padded_kw<T>(g.kw);
  p.hp = g.ph * g.pool + g.kh - 1;
  p.ws = imax(g.w + 2 * g.pad_w, g.pw * g.pool - 1 + p.nq * L);
  p.gws = g.w + 2 * g.pad_w;
  p.cinp = round_up(g.cin, L);
  p.nw = g.kw * p.cinp / L;

  const bool row_tile = p.nq == 1 && g.kh <= kMaxKhTile;  // all kh rows of a filter per pass
  if (!need_gw) {
    p.weight = WeightGradPath::kNone;
  } else if (!need_gi && g.cin == 1 && row_tile) {
    p.weight = g.pool == 2 ? WeightGradPath::kFirstLayerPool2 : WeightGradPath::kFirstLayer;
  } else if (g.cin > 1 && weight_grad_cl_supported(p.nw)) {
    p.weight = need_gi && weight_and_input_grad_cl_supported(p.nw)
                   ? WeightGradPath::kChannelsLastWithInput
                   : WeightGradPath::kChannelsLast;
  } else {
    p.weight = row_tile ? WeightGradPath::kPlanarTile : WeightGradPath::kPlanarRows;
  }
  const bool first_layer =
      p.weight == WeightGradPath::kFirstLayerPool2 || p.weight == WeightGradPath::kFirstLayer;
  const bool channels_last = p.weight == WeightGradPath::kChannelsLastWithInput ||
                             p.weight == WeightGradPath::kChannelsLast;
  p.grad_bias = need_gb;
  p.grad_input = need_gi;
  p.xp = need_gw && !channels_last;
  p.xp_zero_rows = first_layer;
  p.xcl = channels_last;
  p.list = need_gi || (need_gw && !first_layer);
  p.list_pix = need_gi || channels_last;
  p.scatter = need_gi && p.weight != WeightGradPath::kChannelsLastWithInput;

  p.hpx = first_layer ? p.hp + g.kh : p.hp;
  p.plane = p.hpx * p.ws;
  p.xp_size = p.xp ? g.cin * p.plane : 0;
  p.gxp_size = need_gi ? p.hp * p.gws * p.cinp : 0;
  p.wt_size = need_gi ? g.cout * g.kh * g.kw * p.cinp : 0;
  p.xcl_size = channels_last ? p.hp * p.gws * p.cinp : 0;
  p.gwcl_size = channels_last ? g.cout * g.kh * p.nw * L : 0;
  p.ncode = p.weight == WeightGradPath::kFirstLayer ? imax(256, int64_t{p.no_grad} + 1) : 0;
  p.ndecoded = p.weight == WeightGradPath::kFirstLayerPool2 ? 2 * p.cells : 0;
  return p;
}

}  // namespace
}  // namespace FMNIST_ISA
}  // namespace cpu
}  // namespace fmnist_ext
