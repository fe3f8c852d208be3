"""Pure-PyTorch multi-scale deformable attention (the reference every kernel is tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``grid_sample`` (align_corners=False, zero padding).

    Args:
        value: (N, S, M, D) with S = sum(H_l * W_l) over levels.
        spatial_shapes: (L, 2) long, (H_l, W_l) per level.
        level_start_index: (L,) long, offset of each level in S (unused here, kept for the signature).
        sampling_locations: (N, Lq, M, L, P, 2) in [0, 1], x first.
        attention_weights: (N, Lq, M, L, P).
    Returns:
        (N, Lq, M * D).
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L*P)
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
