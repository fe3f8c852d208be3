"""Sine position encoding of Deformable DETR (normalised, scale 2*pi, temperature 10000)."""

from __future__ import annotations

import math

import torch
from torch import nn


class PositionEmbeddingSine(nn.Module):
    """2-D sine/cosine encoding of the unpadded pixel coordinates, as in DETR / Deformable DETR.

    Coordinates are cumulative counts of valid pixels, normalised by the valid extent with Deformable
    DETR's half-pixel offset: ``(y - 0.5) / (y_max + eps) * scale``. Computed in float32.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float | None = None, eps: float = 1e-6):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool padding mask (True = padding) -> (B, 2 * num_pos_feats, H, W) float32 encoding."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
