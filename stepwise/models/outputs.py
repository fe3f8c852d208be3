"""The detector's forward output: everything training, distillation and analysis need, without hooks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class DetectorOutput:
    """Per-decoder-layer predictions of a Deformable DETR forward pass (B images, Q queries, K logits).

    Attributes:
        logits: one (B, Q, K) tensor per decoder layer; the last is the final prediction. K is the head's
            output size (C for sigmoid, more for grouped heads).
        boxes: one (B, Q, 4) tensor per decoder layer, cxcywh normalised to [0, 1] of the unpadded image.
        query_features: one (B, Q, D) tensor per decoder layer: the decoder output the class head reads.
        proj_features: the ``input_proj`` outputs, one (B, D, H_l, W_l) per feature level.
        proj_masks: padding masks per level, (B, H_l, W_l) bool, True on padding.
        enc_logits: two-stage encoder proposal logits (B, S, K), or None.
        enc_boxes: two-stage encoder proposal boxes (B, S, 4) cxcywh, or None.
    """

    logits: list[torch.Tensor]
    boxes: list[torch.Tensor]
    query_features: list[torch.Tensor]
    proj_features: list[torch.Tensor] = field(default_factory=list)
    proj_masks: list[torch.Tensor] = field(default_factory=list)
    enc_logits: torch.Tensor | None = None
    enc_boxes: torch.Tensor | None = None

    @property
    def pred_logits(self) -> torch.Tensor:
        """Final-layer logits (B, Q, K)."""
        return self.logits[-1]

    @property
    def pred_boxes(self) -> torch.Tensor:
        """Final-layer boxes (B, Q, 4), cxcywh in [0, 1]."""
        return self.boxes[-1]
