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

// Channel-vectorised forms for a contiguous run of `channels` channels (used by the CPU kernel; the CUDA
// kernel spreads channels over lanes and uses the per-channel forms above). Same math.

// Forward: out[d] += scale * sample(d) for d < channels.
template <typename scalar_t, typename acc_t>
STEPWISE_HOST_DEVICE void bilinear_sample_channels(const scalar_t* __restrict__ value, int64_t stride,
                                                   const BilinearCorners<acc_t>& c, acc_t scale,
                                                   acc_t* __restrict__ out, int64_t channels) {
  for (int k = 0; k < 4; ++k) {
    if (c.index[k] < 0) continue;
    const scalar_t* __restrict__ v = value + c.index[k] * stride;
    const acc_t wk = scale * c.weight[k];
    for (int64_t d = 0; d < channels; ++d) out[d] += wk * static_cast<acc_t>(v[d]);
  }
}

// Backward for all channels of one sample with attention weight `attn` and output gradient `grad_out`:
// grad_value[corner][d] += attn * w_corner * grad_out[d] (plain adds: the caller owns grad_value);
// returns dL/d(attn) and sets dL/dh, dL/dw in pixel units. Uses dot_k = sum_d grad_out[d] * v_k[d].
template <typename scalar_t, typename acc_t>
STEPWISE_HOST_DEVICE acc_t bilinear_backward_channels(const scalar_t* __restrict__ value,
                                                      acc_t* __restrict__ grad_value, int64_t stride,
                                                      const BilinearCorners<acc_t>& c, acc_t attn,
                                                      const scalar_t* __restrict__ grad_out, int64_t channels,
                                                      acc_t& grad_h, acc_t& grad_w) {
  acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  for (int k = 0; k < 4; ++k) {
    if (c.index[k] < 0) continue;
    const scalar_t* __restrict__ v = value + c.index[k] * stride;
    acc_t* __restrict__ gv = grad_value + c.index[k] * stride;
    const acc_t wk = attn * c.weight[k];
    acc_t sum = acc_t(0);
    for (int64_t d = 0; d < channels; ++d) {
      const acc_t g = static_cast<acc_t>(grad_out[d]);
      sum += g * static_cast<acc_t>(v[d]);
      gv[d] += wk * g;
    }
    dot[k] = sum;
  }
  grad_h = attn * (c.hw * (dot[2] - dot[0]) + c.lw * (dot[3] - dot[1]));
  grad_w = attn * (c.hh * (dot[1] - dot[0]) + c.lh * (dot[3] - dot[2]));
  return c.weight[0] * dot[0] + c.weight[1] * dot[1] + c.weight[2] * dot[2] + c.weight[3] * dot[3];
}

}  // namespace stepwise_ops
