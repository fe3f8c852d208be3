"""The set-prediction training objective: Hungarian matching, then classification (through the head),
L1 and GIoU box losses on every decoder layer and on the two-stage encoder proposals.

``criterion(outputs, targets)`` returns **unweighted** named losses; ``criterion.weight_dict`` holds the
weights and ``criterion.total(losses)`` the weighted sum. Names: ``loss_ce``, ``loss_bbox``, ``loss_giou``
for the final layer, the same with ``_0`` .. ``_{L-2}`` for the earlier decoder layers and ``_enc`` for
the encoder proposals; ``class_error`` and ``cardinality_error`` are logging-only metrics.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou_loss

from stepwise.heads.base import ClassifierHead
from stepwise.models.matcher import HungarianMatcher, Match, build_matcher
from stepwise.models.outputs import DetectorOutput

LOSSES = ("labels", "boxes")


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """All-reduce ``value`` to its mean over processes (identity without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class SetCriterion(nn.Module):
    """Deformable DETR's criterion, talking to the classifier only through the head interface.

    Args:
        matcher: assigns queries to targets from (scores, boxes).
        head: the classifier head (``scores`` for matching and metrics, ``loss`` for ``loss_ce``).
        weight_dict: loss name -> weight, including the ``_i``/``_enc`` copies (see ``expand_weights``).
        losses: which of ``LOSSES`` to compute.
        aux_loss: also compute losses on the earlier decoder layers.
        reduce_fn: maps this process's box count (a scalar tensor) to its mean over processes; default
            torch.distributed's all-reduce when initialised (pass e.g. ``lambda t: accelerator.reduce(t,
            "mean")``).
    """

    def __init__(self, matcher: HungarianMatcher, head: ClassifierHead, weight_dict: dict[str, float],
                 losses: Iterable[str] = LOSSES, aux_loss: bool = True,
                 reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        unknown = set(losses) - set(LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; choose from {LOSSES}")
        self.matcher, self.head = matcher, head
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.aux_loss = aux_loss
        self.reduce_fn = reduce_fn or mean_across_processes

    def match(self, outputs: DetectorOutput, targets: list[dict], layer: int = -1) -> list[Match]:
        """Hungarian matches of decoder layer ``layer`` (default the final one): B (query_idx, target_idx)."""
        return self.matcher(self.head.scores(outputs.logits[layer]), outputs.boxes[layer], targets)

    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        """Mean number of target boxes per process (all-reduced), at least 1: the loss normaliser."""
        count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
        return max(float(self.reduce_fn(count)), 1.0)

    def forward(self, outputs: DetectorOutput, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Unweighted losses (scalar tensors) of every layer plus logging metrics.

        Args:
            outputs: the detector's output; ``logits[l]`` (B, Q, K), ``boxes[l]`` (B, Q, 4) cxcywh.
            targets: B dicts with ``labels`` (T_b,) contiguous and ``boxes`` (T_b, 4) normalised cxcywh.
        """
        final_logits, final_boxes = outputs.logits[-1], outputs.boxes[-1]
        full_targets, targets = targets, without_ignored(targets)
        num_boxes = self.num_boxes(targets, final_logits.device)
        matches, targets = self._match(final_logits, final_boxes, full_targets, targets)
        losses = self.layer_losses(final_logits, final_boxes, matches, targets, num_boxes,
                                   features=outputs.query_features[-1], layer="")
        losses.update(self.metrics(final_logits, matches, targets))
        if self.aux_loss:
            for i, (logits, boxes) in enumerate(zip(outputs.logits[:-1], outputs.boxes[:-1])):
                layer_matches, layer_targets = self._match(logits, boxes, full_targets, targets)
                layer = self.layer_losses(logits, boxes, layer_matches, layer_targets, num_boxes,
                                          features=outputs.query_features[i], layer=str(i))
                losses.update({f"{k}_{i}": v for k, v in layer.items()})
        if outputs.enc_logits is not None:
            # Encoder proposals are class-agnostic: every target is class 0, matched on its own.
            enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_full = enc_targets if full_targets is targets else \
                [{**t, "labels": torch.zeros_like(t["labels"])} for t in full_targets]
            enc_matches, enc_targets = self._match(outputs.enc_logits, outputs.enc_boxes, enc_full, enc_targets)
            layer = self.layer_losses(outputs.enc_logits, outputs.enc_boxes, enc_matches, enc_targets, num_boxes,
                                      features=None, layer="enc")
            losses.update({f"{k}_enc": v for k, v in layer.items()})
        return losses

    def _match(self, logits: torch.Tensor, boxes: torch.Tensor, full_targets: list[dict],
               targets: list[dict]) -> tuple[list[Match], list[dict]]:
        """Match one layer. Without "ignore" boxes: the matcher's result and ``targets``. With them, all
        boxes (real and ignored) are matched together; pairs with an ignored box are dropped, the
        remaining target indices refer to ``targets`` (the real boxes), and each target gets
        ``ignore_queries`` (Q,) bool: the queries matched to ignored boxes, which the head must leave out
        of its loss (neither object nor background)."""
        matches = self.matcher(self.head.scores(logits), boxes, full_targets)
        if full_targets is targets:
            return matches, targets
        if not self.head.supports_ignore:
            raise ValueError(f"training targets have 'ignore' boxes (replay set written with ignore regions) "
                             f"but the {type(self.head).__name__} head cannot leave queries out of its loss; "
                             f"use head=sigmoid or a replay set without ignore regions")
        kept, marked = [], []
        for (q, j), full in zip(matches, full_targets):
            ignore = full.get("ignore")
            ignore = torch.zeros(len(full["labels"]), dtype=torch.bool) if ignore is None else ignore.cpu()
            real_index = torch.cumsum(~ignore, 0) - 1  # full index -> index among the real boxes
            hit = ignore[j]
            kept.append((q[~hit], real_index[j[~hit]]))
            mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            mask[q[hit].to(logits.device)] = True
            marked.append(mask)
        return kept, [{**t, "ignore_queries": m} for t, m in zip(targets, marked)]

    def layer_losses(self, logits: torch.Tensor, boxes: torch.Tensor, matches: list[Match],
                     targets: list[dict], num_boxes: float, features: torch.Tensor | None = None,
                     layer: str = "") -> dict[str, torch.Tensor]:
        """Losses of one layer: the head's classification losses and/or L1 + GIoU of matched boxes.

        ``features`` (B, Q, D) are the query features the logits came from (None for the encoder
        proposals); ``layer`` is the loss-name suffix ("" final, "0".."L-2", "enc"), passed to the head.
        """
        losses = {}
        if "labels" in self.losses:
            head_targets = targets
            if getattr(self.head, "needs_query_overlaps", False) and layer != "enc":
                head_targets = with_query_overlaps(boxes, targets)
            losses.update(self.head.loss(logits, matches, head_targets, num_boxes, features=features, layer=layer))
        if "boxes" in self.losses:
            losses.update(self.box_losses(boxes, matches, targets, num_boxes))
        return losses

    @staticmethod
    def box_losses(boxes: torch.Tensor, matches: list[Match], targets: list[dict],
                   num_boxes: float) -> dict[str, torch.Tensor]:
        """L1 on cxcywh and 1 - GIoU of the matched (B, Q, 4) boxes, summed and divided by ``num_boxes``."""
        batch_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)]).to(boxes.device)
        query_idx = torch.cat([q for q, _ in matches]).to(boxes.device)
        src = boxes[batch_idx, query_idx].float()
        tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, matches)])
        tgt = tgt.to(src)
        loss_bbox = F.l1_loss(src, tgt, reduction="sum")
        loss_giou = generalized_box_iou_loss(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"),
                                             reduction="sum")
        return {"loss_bbox": loss_bbox / num_boxes, "loss_giou": loss_giou / num_boxes}

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, matches: list[Match], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Logging only: ``class_error`` = 100 - top-1 accuracy (%) of matched queries on head scores;
        ``cardinality_error`` = mean |#queries with max score >= 0.5 - #targets| per image."""
        scores = self.head.scores(logits)
        predicted, truth = [], []
        for b, ((q, j), t) in enumerate(zip(matches, targets)):
            predicted.append(scores[b, q.to(scores.device)].argmax(-1))
            truth.append(t["labels"][j.to(t["labels"].device)].to(scores.device))
        predicted, truth = torch.cat(predicted), torch.cat(truth)
        accuracy = (predicted == truth).float().mean() * 100 if truth.numel() else scores.new_tensor(100.0)
        detected = (scores.max(-1).values >= 0.5).sum(1).float()
        counts = torch.tensor([float(len(t["labels"])) for t in targets], device=scores.device)
        return {"class_error": 100 - accuracy, "cardinality_error": F.l1_loss(detected, counts)}

    def total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Weighted sum of the ``loss_*`` entries of ``losses``; metrics are ignored.

        Raises:
            KeyError: a loss has no weight (e.g. the criterion was built for fewer decoder layers).
        """
        missing = [k for k in losses if k.startswith("loss_") and k not in self.weight_dict]
        if missing:
            raise KeyError(f"losses {missing} have no weight in criterion.weight_dict (built for other "
                           f"num_layers/two_stage?); known: {sorted(self.weight_dict)}")
        return sum(losses[k] * self.weight_dict[k] for k in losses if k.startswith("loss_"))


@torch.no_grad()
def with_query_overlaps(boxes: torch.Tensor, targets: list[dict]) -> list[dict]:
    """Copies of ``targets`` with, per query of the (B, Q, 4) cxcywh ``boxes``, its best-overlapping GT box:
    ``query_gt`` (Q,) long index into the target's boxes (-1 without boxes) and ``query_iou`` (Q,) float
    IoU with it (0 without boxes). For heads with ``needs_query_overlaps`` (BAGS's duplicate rule)."""
    out = []
    for b, target in enumerate(targets):
        queries = boxes.shape[1]
        gt = target["boxes"].to(boxes.device)
        if len(gt):
            iou = box_iou(box_convert(boxes[b].float(), "cxcywh", "xyxy"), box_convert(gt.float(), "cxcywh", "xyxy"))
            best_iou, best_gt = iou.max(dim=1)
        else:
            best_iou = boxes.new_zeros(queries, dtype=torch.float32)
            best_gt = torch.full((queries,), -1, dtype=torch.long, device=boxes.device)
        out.append({**target, "query_gt": best_gt, "query_iou": best_iou})
    return out


def without_ignored(targets: list[dict]) -> list[dict]:
    """``targets`` itself when no target has an ``ignore`` flag set; else copies holding only the real
    boxes (``labels``, ``boxes``, ``ann_ids`` filtered)."""
    if not any("ignore" in t and bool(t["ignore"].any()) for t in targets):
        return targets
    out = []
    for t in targets:
        keep = ~t["ignore"].to(torch.bool) if "ignore" in t else torch.ones(len(t["labels"]), dtype=torch.bool)
        out.append({**t, **{k: t[k][keep.to(t[k].device)] for k in ("labels", "boxes", "ann_ids") if k in t}})
    return out


def expand_weights(base: dict[str, float], num_layers: int, aux_loss: bool, two_stage: bool) -> dict[str, float]:
    """Copy the final-layer weights to ``_0`` .. ``_{num_layers-2}`` (if ``aux_loss``) and ``_enc``."""
    weights = dict(base)
    suffixes = [str(i) for i in range(num_layers - 1)] if aux_loss else []
    suffixes += ["enc"] if two_stage else []
    for suffix in suffixes:
        weights.update({f"{k}_{suffix}": v for k, v in base.items()})
    return weights


def build_criterion(cfg_loss, head: ClassifierHead, num_layers: int = 6, two_stage: bool = False,
                    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SetCriterion:
    """The criterion from the config's ``loss`` node for a detector with ``num_layers`` decoder layers.

    ``loss.ce``/``bbox``/``giou`` weight the losses (plus ``head.loss_weights`` for extra head losses),
    ``loss.cost_*`` configure the matcher, ``loss.aux_loss`` switches the per-layer losses.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    base = {"loss_ce": float(cfg_loss.ce), "loss_bbox": float(cfg_loss.bbox), "loss_giou": float(cfg_loss.giou),
            **head.loss_weights}
    aux_loss = bool(cfg_loss.aux_loss)
    return SetCriterion(build_matcher(cfg_loss), head, expand_weights(base, num_layers, aux_loss, two_stage),
                        aux_loss=aux_loss, reduce_fn=reduce_fn)
