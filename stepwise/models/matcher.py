"""Hungarian matching between predictions and ground truth (Deformable DETR's focal-cost matcher).

The matcher knows nothing of heads: it takes class *scores* (probabilities from ``head.scores``), so a
grouped head (BAGS) or a background-channel head (BACL) is matched with the same scores it is evaluated
with.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

from stepwise.utils.finite import NonFiniteCostError

Match = tuple[torch.Tensor, torch.Tensor]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising a weighted class + L1 + GIoU cost.

    cost = cost_class * focal_cost(p) + cost_bbox * L1(cxcywh) - cost_giou * GIoU(xyxy), with the focal
    cost alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)) on the target's class score p.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def forward(self, scores: torch.Tensor, boxes: torch.Tensor,
                targets: list[dict[str, torch.Tensor]]) -> list[Match]:
        """Match each image's queries to its targets.

        Args:
            scores: (B, Q, C) class probabilities (``head.scores(logits)``).
            boxes: (B, Q, 4) predicted boxes, cxcywh normalised to [0, 1].
            targets: B dicts with ``labels`` (T_b,) long and ``boxes`` (T_b, 4) cxcywh normalised.

        Returns:
            B pairs ``(query_idx, target_idx)`` of CPU long tensors of length min(Q, T_b), sorted by query.
        """
        if scores.shape[:2] != boxes.shape[:2] or len(targets) != scores.shape[0]:
            raise ValueError(f"matcher: scores {tuple(scores.shape)}, boxes {tuple(boxes.shape)} and "
                             f"{len(targets)} targets disagree on batch/query size")
        return [self._match_one(scores[b], boxes[b], t, b) for b, t in enumerate(targets)]

    def _match_one(self, scores: torch.Tensor, boxes: torch.Tensor, target: dict, b: int) -> Match:
        """(Q, C) scores and (Q, 4) boxes of one image against its T targets."""
        labels, tgt_boxes = target["labels"], target["boxes"]
        if labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.long)
            return empty, empty.clone()
        cost = self.cost(scores, boxes, labels.to(scores.device), tgt_boxes.to(boxes.device))
        if not torch.isfinite(cost).all():
            image = target.get("image_id", b)
            image = image.item() if isinstance(image, torch.Tensor) else image
            if not (torch.isfinite(scores).all() and torch.isfinite(boxes).all()):
                raise NonFiniteCostError(
                    f"image {image}: non-finite matching cost: the model's predictions are non-finite (NaN/inf "
                    f"class scores or boxes), i.e. training diverged (lower the lr; check the last checkpoint)")
            raise NonFiniteCostError(f"image {image}: non-finite matching cost with finite predictions: a target "
                                     f"box is degenerate or non-finite ({tgt_boxes.tolist()[:5]})")
        query_idx, target_idx = linear_sum_assignment(cost.cpu().numpy())
        return (torch.as_tensor(query_idx, dtype=torch.long), torch.as_tensor(target_idx, dtype=torch.long))

    def cost(self, scores: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
             tgt_boxes: torch.Tensor) -> torch.Tensor:
        """(Q, C) scores, (Q, 4) boxes, (T,) labels, (T, 4) target boxes -> (Q, T) matching cost."""
        prob = scores[:, labels].float()
        neg = (1 - self.alpha) * prob.pow(self.gamma) * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob).pow(self.gamma) * -(prob + 1e-8).log()
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt_boxes, "cxcywh", "xyxy"))
        return self.cost_class * (pos - neg) + self.cost_bbox * cost_bbox - self.cost_giou * giou


def build_matcher(cfg_loss) -> HungarianMatcher:
    """The matcher from the config's ``loss`` node (cost_class, cost_bbox, cost_giou, cost_alpha, cost_gamma)."""
    return HungarianMatcher(cost_class=cfg_loss.cost_class, cost_bbox=cfg_loss.cost_bbox, cost_giou=cfg_loss.cost_giou,
                            alpha=cfg_loss.cost_alpha, gamma=cfg_loss.cost_gamma)
