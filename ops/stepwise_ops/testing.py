"""Random inputs for deformable attention tests and benchmarks (tests/test_ops*.py, bench/msda.py)."""

from __future__ import annotations

import torch

SHAPE_SETS = {
    "one_level": [(4, 4)],
    "four_levels": [(8, 8), (4, 4), (2, 2), (1, 1)],
    "non_square": [(6, 10), (3, 5)],
    "original": [(6, 4), (3, 2)],
}


def level_tables(shapes, device="cpu"):
    """(spatial_shapes (L, 2) long, level_start_index (L,) long, S)."""
    spatial = torch.tensor(shapes, dtype=torch.long, device=device)
    areas = spatial.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial, starts, int(areas.sum())


def pixel_coords(size: int, shape, generator) -> torch.Tensor:
    """Pixel coordinates in [-2, size + 1], at least 0.1 px from integers (where bilinear has kinks)."""
    x = torch.rand(shape, generator=generator, dtype=torch.float64) * (size + 3) - 2
    frac = x - x.floor()
    return x.floor() + frac.clamp(0.1, 0.9)


def make_inputs(shapes, n=2, lq=5, m=2, d=4, p=3, dtype=torch.float64, device="cpu", seed=0):
    """value (N,S,M,D), spatial_shapes, level_start_index, sampling_locations (N,Lq,M,L,P,2), attention_weights."""
    g = torch.Generator().manual_seed(seed)
    spatial, starts, s = level_tables(shapes)
    levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    loc = torch.empty(n, lq, m, levels, p, 2, dtype=torch.float64)
    for lvl, (h, w) in enumerate(shapes):
        # location = (pixel + 0.5) / size, the inverse of the op's pixel = loc * size - 0.5
        loc[:, :, :, lvl, :, 0] = (pixel_coords(w, (n, lq, m, p), g) + 0.5) / w
        loc[:, :, :, lvl, :, 1] = (pixel_coords(h, (n, lq, m, p), g) + 0.5) / h
    attn = torch.rand(n, lq, m, levels, p, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    cast = dict(dtype=dtype, device=device)
    return value.to(**cast), spatial.to(device), starts.to(device), loc.to(**cast), attn.to(**cast)


def forward_and_grads(fn, value, spatial, starts, loc, attn, grad_seed=1):
    """Runs fn and backward with a fixed random output gradient; returns (out, grad_value, grad_loc, grad_attn)."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = fn(leaves[0], spatial, starts, leaves[1], leaves[2])
    g = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return (out.detach(), *grads)
