"""The default head: C independent sigmoid logits trained with focal loss (Deformable DETR's)."""

from __future__ import annotations

import math

import torch
from torch import nn

from stepwise.heads.base import ClassifierHead


class SigmoidFocalHead(ClassifierHead):
    """Linear layer to C logits; scores = sigmoid; loss = sigmoid focal (alpha, gamma)."""

    def __init__(self, in_dim: int, num_classes: int, alpha: float = 0.25, gamma: float = 2.0,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = self.num_outputs = num_classes
        self.alpha, self.gamma = alpha, gamma
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.constant_(self.linear.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, **context) -> "SigmoidFocalHead":
        return cls(in_dim, num_classes, alpha=cfg_head.get("alpha", 0.25), gamma=cfg_head.get("gamma", 2.0),
                   prior_prob=cfg_head.get("prior_prob", 0.01))

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C) logits."""
        return self.linear(query_features)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., C) logits -> (..., C) probabilities."""
        return logits.sigmoid()
