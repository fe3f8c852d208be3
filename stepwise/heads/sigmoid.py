"""The default head: C independent sigmoid logits trained with focal loss (Deformable DETR's)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from stepwise.heads.base import ClassifierHead, ignored_queries, matched_labels


class SigmoidFocalHead(ClassifierHead):
    """Linear layer to C logits; scores = sigmoid; loss = sigmoid focal (alpha, gamma)."""

    supports_ignore = True  # honours targets[b]["ignore_queries"] (see SetCriterion._match)

    def __init__(self, in_dim: int, num_classes: int, alpha: float = 0.25, gamma: float = 2.0,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = self.num_outputs = num_classes
        self.alpha, self.gamma = alpha, gamma
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.constant_(self.linear.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg_head, in_dim: int, num_classes: int, **context) -> SigmoidFocalHead:
        return cls(in_dim, num_classes, alpha=cfg_head.alpha, gamma=cfg_head.gamma, prior_prob=cfg_head.prior_prob)

    def forward(self, query_features: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., C) logits."""
        return self.linear(query_features)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., C) logits -> (..., C) probabilities."""
        return logits.sigmoid()

    def loss(self, logits, matches, targets, num_boxes, features=None, layer="") -> dict[str, torch.Tensor]:
        """Sigmoid focal loss of (B, Q, K) logits against one-hot targets of the matched queries.

        Deformable DETR's ``sigmoid_focal_loss(...) * Q``: summed over queries and classes, divided by
        ``num_boxes``. Unmatched queries have all-zero targets. K is the logit width (C, or 1 for the
        class-agnostic encoder proposals).
        """
        batch, queries, width = logits.shape
        labels = matched_labels(matches, targets, queries, fill=width, num_labels=width, device=logits.device)
        onehot = torch.zeros(batch, queries, width + 1, dtype=torch.float32, device=logits.device)
        onehot.scatter_(2, labels.unsqueeze(-1), 1.0)
        loss = sigmoid_focal_loss(logits.float(), onehot[..., :width], alpha=self.alpha, gamma=self.gamma,
                                  reduction="none")
        if any("ignore_queries" in t for t in targets):  # queries on "ignore" boxes: no loss at all
            loss = loss * (~ignored_queries(targets, batch, queries, logits.device)).unsqueeze(-1)
        return {"loss_ce": loss.sum() / num_boxes}
