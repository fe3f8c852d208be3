// CPU kernel of multi-scale deformable attention (float64 / float32; float16 and bfloat16 are
// computed in float32). Forward is parallel over (batch x queries x heads); backward over
// (batch x heads), since each pair owns its slice of grad_value and needs no atomics.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "ms_deform_attn.h"
#include "ms_deform_attn_sampling.h"

namespace stepwise_ops {
namespace {

struct Sizes {
  int64_t n, s, m, d, lq, levels, points;
};

Sizes sizes_of(const at::Tensor& value, const at::Tensor& loc) {
  return {value.size(0), value.size(1), value.size(2), value.size(3), loc.size(1), loc.size(3), loc.size(4)};
}

template <typename scalar_t>
void forward_kernel(const Sizes& z, const scalar_t* value, const int64_t* shapes, const int64_t* starts,
                    const scalar_t* loc, const scalar_t* attn, scalar_t* out) {
  const int64_t md = z.m * z.d;
  at::parallel_for(0, z.n * z.lq * z.m, 1, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> c;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i % z.m, n = i / z.m / z.lq;  // i = (n * Lq + q) * M + m
      scalar_t* out_i = out + i * z.d;
      std::fill(out_i, out_i + z.d, scalar_t(0));
      const scalar_t* loc_i = loc + i * z.levels * z.points * 2;
      const scalar_t* attn_i = attn + i * z.levels * z.points;
      for (int64_t l = 0; l < z.levels; ++l) {
        const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
        const scalar_t* v = value + (n * z.s + starts[l]) * md + m * z.d;
        for (int64_t p = 0; p < z.points; ++p) {
          const int64_t lp = l * z.points + p;
          const scalar_t x = loc_i[2 * lp] * scalar_t(w) - scalar_t(0.5);
          const scalar_t y = loc_i[2 * lp + 1] * scalar_t(h) - scalar_t(0.5);
          if (!bilinear_corners<scalar_t>(h, w, y, x, c)) continue;
          bilinear_sample_channels<scalar_t, scalar_t>(v, md, c, attn_i[lp], out_i, z.d);
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Sizes& z, const scalar_t* grad_out, const scalar_t* value, const int64_t* shapes,
                     const int64_t* starts, const scalar_t* loc, const scalar_t* attn, scalar_t* grad_value,
                     scalar_t* grad_loc, scalar_t* grad_attn) {
  const int64_t md = z.m * z.d;
  // Each (batch, head) pair owns grad_value[n, :, m, :], so the scatter needs no atomics.
  at::parallel_for(0, z.n * z.m, 1, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> c;
    for (int64_t nm = begin; nm < end; ++nm) {
      const int64_t n = nm / z.m, m = nm % z.m;
      for (int64_t q = 0; q < z.lq; ++q) {
        const int64_t i = (n * z.lq + q) * z.m + m;
        const scalar_t* go = grad_out + i * z.d;
        for (int64_t l = 0; l < z.levels; ++l) {
          const int64_t h = shapes[2 * l], w = shapes[2 * l + 1];
          const int64_t offset = (n * z.s + starts[l]) * md + m * z.d;
          for (int64_t p = 0; p < z.points; ++p) {
            const int64_t lp = i * z.levels * z.points + l * z.points + p;
            const scalar_t x = loc[2 * lp] * scalar_t(w) - scalar_t(0.5);
            const scalar_t y = loc[2 * lp + 1] * scalar_t(h) - scalar_t(0.5);
            if (!bilinear_corners<scalar_t>(h, w, y, x, c)) continue;  // gradients stay zero
            scalar_t g_y, g_x;
            grad_attn[lp] = bilinear_backward_channels<scalar_t, scalar_t>(
                value + offset, grad_value + offset, md, c, attn[lp], go, z.d, g_y, g_x);
            grad_loc[2 * lp] = g_x * scalar_t(w);
            grad_loc[2 * lp + 1] = g_y * scalar_t(h);
          }
        }
      }
    }
  });
}

// float16 / bfloat16 run in float32 on the CPU.
at::ScalarType compute_type(const at::Tensor& t) {
  return at::isReducedFloatingType(t.scalar_type()) ? at::kFloat : t.scalar_type();
}

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto ct = compute_type(value);
  const auto v = value.to(ct).contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const auto shapes = spatial_shapes.to(at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kLong).contiguous();
  check_levels_cpu(v, shapes, starts);
  const Sizes z = sizes_of(v, loc);
  auto out = at::empty({z.n, z.lq, z.m * z.d}, v.options());
  if (out.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_forward_cpu", [&] {
      forward_kernel<scalar_t>(z, v.const_data_ptr<scalar_t>(), shapes.const_data_ptr<int64_t>(),
                               starts.const_data_ptr<int64_t>(), loc.const_data_ptr<scalar_t>(),
                               attn.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    });
  }
  return out.to(value.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_output, const at::Tensor& value,
                                                            const at::Tensor& spatial_shapes,
                                                            const at::Tensor& level_start_index,
                                                            const at::Tensor& sampling_locations,
                                                            const at::Tensor& attention_weights) {
  check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const auto ct = compute_type(value);
  const auto v = value.to(ct).contiguous();
  const auto loc = sampling_locations.to(ct).contiguous();
  const auto attn = attention_weights.to(ct).contiguous();
  const auto go = grad_output.to(ct).contiguous();
  const auto shapes = spatial_shapes.to(at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kLong).contiguous();
  check_levels_cpu(v, shapes, starts);
  const Sizes z = sizes_of(v, loc);
  TORCH_CHECK(go.dim() == 3 && go.size(0) == z.n && go.size(1) == z.lq && go.size(2) == z.m * z.d,
              "ms_deform_attn: grad_output must be (N, Lq, M*D) = (", z.n, ", ", z.lq, ", ", z.m * z.d, "), got ",
              grad_output.sizes());
  auto grad_value = at::zeros_like(v);
  auto grad_loc = at::zeros_like(loc);
  auto grad_attn = at::zeros_like(attn);
  if (go.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(ct, "ms_deform_attn_backward_cpu", [&] {
      backward_kernel<scalar_t>(z, go.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                                shapes.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
                                loc.const_data_ptr<scalar_t>(), attn.const_data_ptr<scalar_t>(),
                                grad_value.mutable_data_ptr<scalar_t>(), grad_loc.mutable_data_ptr<scalar_t>(),
                                grad_attn.mutable_data_ptr<scalar_t>());
    });
  }
  const auto dt = value.scalar_type();
  return {grad_value.to(dt), grad_loc.to(dt), grad_attn.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(stepwise_ops, CPU, m) {
  m.impl("ms_deform_attn_forward", &forward_cpu);
  m.impl("ms_deform_attn_backward", &backward_cpu);
}

}  // namespace stepwise_ops
