// Declarations and input checks shared by the CPU and CUDA implementations of
// stepwise_ops::ms_deform_attn_forward / ms_deform_attn_backward.
//
// Shapes: value (N, S, M, D); spatial_shapes (L, 2) (H_l, W_l); level_start_index (L,);
// sampling_locations (N, Lq, M, L, P, 2) in [0, 1], x first; attention_weights (N, Lq, M, L, P);
// output and grad_output (N, Lq, M * D).
#pragma once

#include <torch/types.h>

#include <tuple>

namespace stepwise_ops {

inline void check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                         const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                         const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got shape ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got shape ", attention_weights.sizes());
  const int64_t n = value.size(0), m = value.size(2), levels = sampling_locations.size(3);
  TORCH_CHECK(sampling_locations.size(0) == n && sampling_locations.size(2) == m,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value (N, S, M, D) = ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(),
              " does not match sampling_locations ", sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", levels, ", got shape ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", levels, ", got shape ",
              level_start_index.sizes());
  TORCH_CHECK(value.scalar_type() == sampling_locations.scalar_type() &&
                  value.scalar_type() == attention_weights.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  TORCH_CHECK(value.device() == sampling_locations.device() && value.device() == attention_weights.device(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be on one device, got ",
              value.device(), ", ", sampling_locations.device(), ", ", attention_weights.device());
  TORCH_CHECK(at::isIntegralType(spatial_shapes.scalar_type(), /*includeBool=*/false) &&
                  at::isIntegralType(level_start_index.scalar_type(), /*includeBool=*/false),
              "ms_deform_attn: spatial_shapes and level_start_index must be integer tensors, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
}

// On the CPU the level table can be checked against S without a device sync.
inline void check_levels_cpu(const at::Tensor& value, const at::Tensor& shapes, const at::Tensor& starts) {
  const int64_t* s = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < shapes.size(0); ++l) {
    TORCH_CHECK(s[2 * l] > 0 && s[2 * l + 1] > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", s[2 * l],
                ", ", s[2 * l + 1], ") must be positive");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", total, " pixels");
    total += s[2 * l] * s[2 * l + 1];
  }
  TORCH_CHECK(total == value.size(1), "ms_deform_attn: value has S = ", value.size(1),
              " but spatial_shapes sum to ", total, " pixels");
}

}  // namespace stepwise_ops
