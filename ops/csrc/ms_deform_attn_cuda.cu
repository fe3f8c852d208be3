// CUDA kernel of multi-scale deformable attention: float64, float32, float16 and bfloat16, forward and
// backward, accumulation in float32 (float64 for float64). One warp per (batch, query, head); its lanes
// stride over the D channels, so loads of one pixel's channels are coalesced and the location and
// attention-weight gradients are reduced with warp shuffles instead of atomics. grad_value is scattered
// with atomicAdd into a buffer of the accumulation type (float32 for half/bfloat16), then cast.
// All offsets are 64-bit; no batch-size restriction; runs on the inputs' device and current stream.
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace stepwise_ops {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int64_t kMaxBlocks = 1 << 20;  // grid-stride beyond this

struct AtomicAdd {
  template <typename T>
  __device__ void operator()(T* ptr, T v) const { atomicAdd(ptr, v); }
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

struct Sizes {
  int64_t n, s, m, d, lq, levels, points;
};

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(Sizes z, const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                               const scalar_t* __restrict__ attn, scalar_t* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t total = z.n * z.lq * z.m;
  const int64_t md = z.m * z.d;
  const int64_t lp_count = z.levels * z.points;
  BilinearCorners<acc_t> c;
  for (int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; i < total;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t m = i % z.m, n = i / z.m / z.lq;  // i = (n * Lq + q) * M + m
    const scalar_t* loc_i = loc + i * lp_count * 2;
    const scalar_t* attn_i = attn + i * lp_count;
    for (int64_t d = lane; d < z.d; d += kWarp) {
      acc_t acc = acc_t(0);
      for (int64_t l = 0; l < z.levels; ++l) {
        const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
        const scalar_t* v = value + (n * z.s + starts[l]) * md + m * z.d + d;
        for (int64_t p = 0; p < z.points; ++p) {
          const int64_t lp = l * z.points + p;
          const acc_t x = static_cast<acc_t>(loc_i[2 * lp]) * acc_t(w) - acc_t(0.5);
          const acc_t y = static_cast<acc_t>(loc_i[2 * lp + 1]) * acc_t(h) - acc_t(0.5);
          if (!bilinear_corners<acc_t>(h, w, y, x, c)) continue;
          acc += static_cast<acc_t>(attn_i[lp]) * bilinear_sample<scalar_t, acc_t>(v, md, c);
        }
      }
      out[i * z.d + d] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(Sizes z, const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn,
                                acc_t* __restrict__ grad_value, scalar_t* __restrict__ grad_loc,
                                scalar_t* __restrict__ grad_attn) {
  const int lane = threadIdx.x % kWarp;
  const int64_t total = z.n * z.lq * z.m;
  const int64_t md = z.m * z.d;
  const int64_t lp_count = z.levels * z.points;
  BilinearCorners<acc_t> c;
  for (int64_t i = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / kWarp; i < total;
       i += int64_t(gridDim.x) * kWarpsPerBlock) {
    const int64_t m = i % z.m, n = i / z.m / z.lq;
    const scalar_t* go = grad_out + i * z.d;
    for (int64_t l = 0; l < z.levels; ++l) {
      const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
      const int64_t offset = (n * z.s + starts[l]) * md + m * z.d;
      for (int64_t p = 0; p < z.points; ++p) {
        const int64_t lp = i * lp_count + l * z.points + p;
        const acc_t x = static_cast<acc_t>(loc[2 * lp]) * acc_t(w) - acc_t(0.5);
        const acc_t y = static_cast<acc_t>(loc[2 * lp + 1]) * acc_t(h) - acc_t(0.5);
        // Warp-uniform: every lane sees the same point, so the shuffles below run on full warps.
        if (!bilinear_corners<acc_t>(h, w, y, x, c)) continue;  // outputs were zero-initialised
        const acc_t a = static_cast<acc_t>(attn[lp]);
        acc_t g_attn = 0, g_y = 0, g_x = 0;
        for (int64_t d = lane; d < z.d; d += kWarp) {
          acc_t gy, gx;
          const acc_t g = static_cast<acc_t>(go[d]);
          const acc_t sampled = bilinear_backward<scalar_t, acc_t, acc_t>(
              value + offset + d, grad_value + offset + d, md, c, g * a, AtomicAdd{}, gy, gx);
          g_attn += g * sampled;
          g_y += gy;
          g_x += gx;
        }
        g_attn = warp_sum(g_attn);
        g_y = warp_sum(g_y);
        g_x = warp_sum(g_x);
        if (lane == 0) {
          grad_attn[lp] = static_cast<scalar_t>(g_attn);
          grad_loc[2 * lp] = static_cast<scalar_t>(g_x * acc_t(w));
          grad_loc[2 * lp + 1] = static_cast<scalar_t>(g_y * acc_t(h));
        }
      }
    }
  }
}

int64_t num_blocks(int64_t warps) {
  return std::max<int64_t>(1, std::min<int64_t>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock, kMaxBlocks));
}

Sizes sizes_of(const at::Tensor& value, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
  const Sizes z = sizes_of(v, loc);
  auto out = at::empty({z.n, z.lq, z.m * z.d}, v.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(z.n * z.lq * z.m), kWarp * kWarpsPerBlock, 0, stream>>>(
        z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
        loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& value,
                                                             const at::Tensor& spatial_shapes,
                                                             const at::Tensor& level_start_index,
                                                             const at::Tensor& sampling_locations,
                                                             const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto v = value.contiguous();
  const auto loc = sampling_locations.contiguous();
  const auto attn = attention_weights.contiguous();
  const auto go = grad_output.to(v.scalar_type()).contiguous();
  const auto shapes = spatial_shapes.to(value.device(), at::kLong).contiguous();
  const auto starts = level_start_index.to(value.device(), at::kLong).contiguous();
  const Sizes z = sizes_of(v, loc);
  TORCH_CHECK(go.dim() == 3 && go.size(0) == z.n && go.size(1) == z.lq && go.size(2) == z.m * z.d,
              "ms_deform_attn: grad_output must be (N, Lq, M*D) = (", z.n, ", ", z.lq, ", ", z.m * z.d, "), got ",
              grad_output.sizes());
  const auto acc_type = at::toOpMathType(v.scalar_type());
  auto grad_value = at::zeros(v.sizes(), v.options().dtype(acc_type));
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  if (go.numel() > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t><<<num_blocks(z.n * z.lq * z.m), kWarp * kWarpsPerBlock, 0, stream>>>(
          z, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
          starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
          grad_value.mutable_data_ptr<acc_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
          grad_attn.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {grad_value.to(v.scalar_type()), grad_loc, grad_attn};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepwise_ops, CUDA, m) {
  m.impl("ms_deform_attn_forward", &forward_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace stepwise_ops
