// Bilinear sampling math of multi-scale deformable attention, shared by the CPU and CUDA kernels.
//
// Semantics of the original Deformable DETR op: a sampling location loc in [0, 1] maps to the pixel
// coordinate loc * size - 0.5 (grid_sample with align_corners=False), and corners outside the map read
// as zero. `value` points at element (y=0, x=0) of one level for one (batch, head, channel); pixels are
// `stride` elements apart (stride = heads * channels for the (N, S, M, D) layout).
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define STEPWISE_HOST_DEVICE __host__ __device__ __forceinline__
#define STEPWISE_UNROLL _Pragma("unroll")
#else
#define STEPWISE_HOST_DEVICE inline
#define STEPWISE_UNROLL
#endif

namespace stepwise_ops {

// Corner indices and bilinear weights of one sampling point; a corner outside the map has index -1.
template <typename acc_t>
struct BilinearCorners {
  int64_t index[4];  // top-left, top-right, bottom-left, bottom-right, in pixels (y * width + x)
  acc_t weight[4];
  acc_t lh, lw, hh, hw;  // fractional distances, kept for the location gradient
};

// Returns false when the point is wholly outside (no corner inside the map); pixel coords h, w.
template <typename acc_t>
STEPWISE_HOST_DEVICE bool bilinear_corners(int64_t height, int64_t width, acc_t h, acc_t w,
                                           BilinearCorners<acc_t>& c) {
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < acc_t(height) && w < acc_t(width))) return false;
  // floor() of a value > -1 fits in int64 and is >= -1.
  const int64_t h_low = static_cast<int64_t>(h >= acc_t(0) ? h : h - acc_t(1));
  const int64_t w_low = static_cast<int64_t>(w >= acc_t(0) ? w : w - acc_t(1));
  const int64_t h_high = h_low + 1;
  const int64_t w_high = w_low + 1;
  c.lh = h - acc_t(h_low);
  c.lw = w - acc_t(w_low);
  c.hh = acc_t(1) - c.lh;
  c.hw = acc_t(1) - c.lw;
  const bool top = h_low >= 0, bottom = h_high <= height - 1;
  const bool left = w_low >= 0, right = w_high <= width - 1;
  c.index[0] = (top && left) ? h_low * width + w_low : -1;
  c.index[1] = (top && right) ? h_low * width + w_high : -1;
  c.index[2] = (bottom && left) ? h_high * width + w_low : -1;
  c.index[3] = (bottom && right) ? h_high * width + w_high : -1;
  c.weight[0] = c.hh * c.hw;
  c.weight[1] = c.hh * c.lw;
  c.weight[2] = c.lh * c.hw;
  c.weight[3] = c.lh * c.lw;
  return true;
}

// Forward: the bilinearly interpolated value at the corners.
template <typename scalar_t, typename acc_t>
STEPWISE_HOST_DEVICE acc_t bilinear_sample(const scalar_t* value, int64_t stride,
                                           const BilinearCorners<acc_t>& c) {
  acc_t out = acc_t(0);
STEPWISE_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (c.index[k] >= 0) out += c.weight[k] * static_cast<acc_t>(value[c.index[k] * stride]);
  }
  return out;
}

// Backward of one sample. `top_grad` = dL/d(output) * attention weight. Scatters top_grad * corner
// weight into grad_value through `add(ptr, v)` (plain += on the CPU, atomicAdd on CUDA) and returns
// the sampled value (for the attention-weight gradient) and dL/dh, dL/dw in pixel units.
template <typename scalar_t, typename acc_t, typename grad_t, typename AddFn>
STEPWISE_HOST_DEVICE acc_t bilinear_backward(const scalar_t* value, grad_t* grad_value, int64_t stride,
                                             const BilinearCorners<acc_t>& c, acc_t top_grad,
                                             const AddFn& add, acc_t& grad_h, acc_t& grad_w) {
  acc_t v[4];
STEPWISE_UNROLL
  for (int k = 0; k < 4; ++k) {
    if (c.index[k] >= 0) {
      v[k] = static_cast<acc_t>(value[c.index[k] * stride]);
      add(grad_value + c.index[k] * stride, static_cast<grad_t>(top_grad * c.weight[k]));
    } else {
      v[k] = acc_t(0);
    }
  }
  grad_h = top_grad * (c.hw * (v[2] - v[0]) + c.lw * (v[3] - v[1]));
  grad_w = top_grad * (c.hh * (v[1] - v[0]) + c.lh * (v[3] - v[2]));
  return c.weight[0] * v[0] + c.weight[1] * v[1] + c.weight[2] * v[2] + c.weight[3] * v[3];
}

}  // namespace stepwise_ops
