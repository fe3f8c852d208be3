"""Detections from the detector's output: top-k over queries x classes of the head's scores, boxes in
pixels of the original image, and the LVIS results format for the evaluator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_convert

from stepwise.heads.base import ClassifierHead
from stepwise.models.outputs import DetectorOutput


class PostProcess:
    """Deformable DETR's post-processing, through the head interface (works for any head).

    Args:
        num_top: detections kept per image (LVIS evaluates 300), capped at Q x C.
        head: the classifier head whose ``scores`` turn logits into class probabilities; may instead be
            given per call.
    """

    def __init__(self, num_top: int = 300, head: ClassifierHead | None = None):
        if num_top < 1:
            raise ValueError(f"num_top must be >= 1, got {num_top}")
        self.num_top, self.head = num_top, head

    def with_num_top(self, num_top: int) -> "PostProcess":
        """The same post-processing (same head) keeping ``num_top`` detections per image."""
        return PostProcess(num_top=num_top, head=self.head)

    def scores(self, outputs: DetectorOutput, head: ClassifierHead | None = None) -> torch.Tensor:
        """Final-layer class probabilities (B, Q, C) as float32, from the head's ``scores``."""
        head = head or self.head
        if head is None:
            raise ValueError("PostProcess needs the classifier head (PostProcess(head=...) or call(..., head=...))")
        return head.scores(outputs.logits[-1]).float()

    @torch.no_grad()
    def __call__(self, outputs: DetectorOutput, orig_sizes: torch.Tensor,
                 head: ClassifierHead | None = None) -> list[dict[str, torch.Tensor]]:
        """Per image: ``scores`` (K,), ``labels`` (K,) contiguous class indices, ``boxes`` (K, 4) xyxy pixels.

        Args:
            outputs: final-layer ``logits`` (B, Q, K_head) and ``boxes`` (B, Q, 4) cxcywh in [0, 1].
            orig_sizes: (B, 2) (h, w) of the original images; boxes are scaled to them and clipped.
        """
        scores = self.scores(outputs, head)
        batch, queries, classes = scores.shape
        if orig_sizes.shape != (batch, 2):
            raise ValueError(f"orig_sizes must be ({batch}, 2) (h, w), got {tuple(orig_sizes.shape)}")
        top_scores, top_idx = scores.flatten(1).topk(min(self.num_top, queries * classes), dim=1)
        query_idx, labels = top_idx // classes, top_idx % classes
        boxes = box_convert(outputs.boxes[-1].float(), "cxcywh", "xyxy")
        boxes = boxes.gather(1, query_idx.unsqueeze(-1).expand(-1, -1, 4))
        h, w = orig_sizes.to(boxes).unbind(1)
        scale = torch.stack([w, h, w, h], dim=1).unsqueeze(1)  # (B, 1, 4)
        boxes = torch.minimum((boxes * scale).clamp(min=0), scale)
        return [{"scores": s, "labels": c, "boxes": b} for s, c, b in zip(top_scores, labels, boxes)]


def to_lvis_results(detections: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int],
                    index_to_category_id: Sequence[int] | Mapping[int, int]) -> list[dict]:
    """LVIS/COCO results ``[{image_id, category_id, bbox: [x, y, w, h], score}]`` from ``PostProcess`` output.

    Args:
        detections: per image ``scores`` (K,), ``labels`` (K,) contiguous, ``boxes`` (K, 4) xyxy pixels.
        image_ids: the dataset image id of each entry of ``detections``.
        index_to_category_id: contiguous class index -> dataset category id (a list or a mapping).
    """
    if len(detections) != len(image_ids):
        raise ValueError(f"{len(detections)} detections but {len(image_ids)} image ids")
    results = []
    for det, image_id in zip(detections, image_ids):
        image_id = int(image_id)
        xywh = box_convert(det["boxes"].detach().float().cpu(), "xyxy", "xywh").tolist()
        for label, box, score in zip(det["labels"].tolist(), xywh, det["scores"].detach().float().cpu().tolist()):
            try:
                category_id = index_to_category_id[label]
            except (IndexError, KeyError):
                raise ValueError(f"image {image_id}: class index {label} has no category id "
                                 f"({len(index_to_category_id)} known)") from None
            results.append({"image_id": image_id, "category_id": int(category_id), "bbox": box,
                            "score": float(score)})
    return results
