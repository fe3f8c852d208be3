"""The step-wise method's knowledge transfer losses from the head-class expert (teacher) to the unified model
(the losses; the stage that trains with them is :mod:`stepwise.stages.distill`).

* :func:`head_box_masks` + :func:`masked_feature_loss` — L_fm_dis (Eq. 2): squared error between the
  student's and the teacher's ``input_proj`` outputs, summed over channels, only inside head-class
  ground-truth boxes mapped onto each level's grid, divided by 2 x the mask area of each (level, image) and
  averaged over all (level, image) pairs, a pair without head boxes counting 0 (the public ``loss_feature``;
  ``normalize="pooled"`` divides the sum over everything by the total area instead).
* :func:`class_distillation_loss` — L_cls_dis (Eq. 3): KL(teacher || student) between class distributions
  over the head classes (softmax with temperature T, times T^2 as in Hinton et al.; averaged over queries).
  With shared queries the student's class head of each decoder layer reads the *teacher's* query features of
  that layer; every decoder layer gets the term with the same weight (the public code; ``layers="last"``:
  the final layer only).
* :class:`DistillCriterion` — Hungarian loss + lambda_fm * L_fm_dis + lambda_cls * L_cls_dis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stepwise.heads.base import ClassifierHead
from stepwise.models.outputs import DetectorOutput


@dataclass
class TeacherStudentOutput:
    """What the distill stage's forward returns: the student's output and the frozen teacher's."""

    student: DetectorOutput
    teacher: DetectorOutput


def head_box_masks(boxes: Sequence[torch.Tensor], padding_masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Binary masks of the given boxes on every feature level.

    Args:
        boxes: per image, (T_b, 4) normalised cxcywh boxes (relative to the unpadded image).
        padding_masks: per level, (B, H_l, W_l) bool, True on padding (``DetectorOutput.proj_masks``).

    Returns:
        per level, (B, H_l, W_l) float: 1 on every cell a box covers (partly covered cells included:
        x1 = floor(x1 * w_valid), x2 = ceil(x2 * w_valid), likewise y), 0 elsewhere and on padding.
    """
    out = []
    for pad in padding_masks:
        mask = torch.zeros(pad.shape, dtype=torch.float32, device=pad.device)
        for b, image_boxes in enumerate(boxes):
            if image_boxes.numel() == 0:
                continue
            valid = ~pad[b]
            h_valid = int(valid[:, 0].sum()) if valid.shape[1] else 0
            w_valid = int(valid[0, :].sum()) if valid.shape[0] else 0
            cx, cy, w, h = image_boxes.float().unbind(-1)
            corners = torch.stack([(cx - w / 2) * w_valid, (cy - h / 2) * h_valid,
                                   (cx + w / 2) * w_valid, (cy + h / 2) * h_valid], -1)
            for x1, y1, x2, y2 in corners.tolist():
                # 1e-6: a box edge on a cell border must not take the neighbouring cell by rounding error
                x1, y1 = max(math.floor(x1 + 1e-6), 0), max(math.floor(y1 + 1e-6), 0)
                x2, y2 = min(math.ceil(x2 - 1e-6), w_valid), min(math.ceil(y2 - 1e-6), h_valid)
                if x2 > x1 and y2 > y1:
                    mask[b, y1:y2, x1:x2] = 1.0
        out.append(mask)
    return out


FM_NORMALIZE = ("level_image", "pooled")


def masked_feature_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor],
                        masks: Sequence[torch.Tensor], normalize: str = "level_image") -> torch.Tensor:
    """Masked feature distillation; 0 (still connected to the student) when every mask is empty.

    ``normalize="level_image"`` (the public code): mean over the L x B (level, image) pairs of
    sum_{c,h,w} mask * (s - t)^2 / (2 * sum_{h,w} mask), a pair with an empty mask counting 0.
    ``"pooled"``: sum over levels, images, channels and cells of mask * (s - t)^2 / (2 * total mask area),
    which weights each level by its share of the mask cells (the finest level dominates).

    Args:
        student, teacher: per level (B, D, H_l, W_l) features (the teacher's are not differentiated).
        masks: per level (B, H_l, W_l), from :func:`head_box_masks`.
    """
    if normalize not in FM_NORMALIZE:
        raise ValueError(f"unknown L_fm normalisation {normalize!r}; choose one of {FM_NORMALIZE}")
    total = student[0].new_zeros((), dtype=torch.float32)
    if normalize == "pooled":
        area = 0.0
        for s, t, m in zip(student, teacher, masks):
            total = total + ((s.float() - t.detach().float()).pow(2) * m.unsqueeze(1)).sum()
            area += float(m.sum())
        return total / (2 * area) if area > 0 else total * 0.0
    pairs = 0
    for s, t, m in zip(student, teacher, masks):
        per_image = ((s.float() - t.detach().float()).pow(2) * m.unsqueeze(1)).flatten(1).sum(1)  # (B,)
        area = m.flatten(1).sum(1)                                                                 # (B,)
        total = total + (per_image / (2 * area.clamp_min(1.0))).sum()  # empty mask: per_image is 0 too
        pairs += m.shape[0]
    return total / max(pairs, 1)


def class_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            class_index: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) over the classes ``class_index``, per query, averaged over queries.

    Args:
        student_logits, teacher_logits: (B, Q, C) per-class logits.
        class_index: (C_h,) long, the head classes.
        temperature: T; the result is multiplied by T^2.
    """
    s = student_logits.float()[..., class_index] / temperature
    t = teacher_logits.detach().float()[..., class_index] / temperature
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    return kl * temperature ** 2


CLS_LAYERS = ("all", "last")


class DistillCriterion(nn.Module):
    """The set criterion on the student plus the distillation terms.

    Args:
        base: the detector's ``SetCriterion`` (Hungarian loss of the student on the replay set).
        student_heads: the student's class head of every decoder layer (applied to the teacher's query
            features of that layer with shared queries); the last one is the final layer's.
        teacher_heads: the teacher's class head of every decoder layer (its ``class_logits`` are the targets).
        head_classes: (C,) bool, the head classes.
        feature, cls, shared_queries, lambda_fm, lambda_cls, temperature, fm_normalize, cls_layers: the
            ``distill:`` config (see the module docstring).

    Losses: ``loss_fm_dis``; ``loss_cls_dis`` (final layer) and ``loss_cls_dis_0`` .. ``_{L-2}`` (earlier
    decoder layers, ``cls_layers="all"``), each weighted ``lambda_cls``.
    """

    def __init__(self, base: nn.Module, student_heads: Sequence[ClassifierHead], teacher_heads: Sequence[ClassifierHead],
                 head_classes: torch.Tensor, feature: bool = True, cls: bool = True, shared_queries: bool = True,
                 lambda_fm: float = 1.0, lambda_cls: float = 0.1, temperature: float = 1.0,
                 fm_normalize: str = "level_image", cls_layers: str = "all"):
        super().__init__()
        if cls_layers not in CLS_LAYERS:
            raise ValueError(f"unknown distill.cls_layers {cls_layers!r}; choose one of {CLS_LAYERS}")
        if fm_normalize not in FM_NORMALIZE:
            raise ValueError(f"unknown distill.fm_normalize {fm_normalize!r}; choose one of {FM_NORMALIZE}")
        if len(student_heads) != len(teacher_heads):
            raise ValueError(f"{len(student_heads)} student class heads but {len(teacher_heads)} teacher heads")
        self.base = base
        self.student_heads = nn.ModuleList(student_heads)
        self.teacher_heads = list(teacher_heads)  # a list: not submodules (not moved, saved or trained)
        self.register_buffer("head_class_index", torch.nonzero(head_classes.bool()).flatten(), persistent=False)
        self.head_classes = head_classes.bool()
        self.feature, self.cls, self.shared_queries = feature, cls, shared_queries
        self.temperature, self.fm_normalize, self.cls_layers = float(temperature), fm_normalize, cls_layers
        self.weight_dict = dict(base.weight_dict)
        if feature:
            self.weight_dict["loss_fm_dis"] = float(lambda_fm)
        if cls:
            for suffix in self._cls_suffixes():
                self.weight_dict["loss_cls_dis" + suffix] = float(lambda_cls)

    def _cls_suffixes(self) -> list[str]:
        """Loss-name suffix of every distilled decoder layer, in layer order ("_0", ..., "" for the last)."""
        layers = len(self.student_heads)
        return [f"_{i}" for i in range(layers - 1)] + [""] if self.cls_layers == "all" else [""]

    def forward(self, outputs: TeacherStudentOutput, targets: list[dict]) -> dict[str, torch.Tensor]:
        """Unweighted losses: the base criterion's plus ``loss_fm_dis`` / ``loss_cls_dis*``."""
        student, teacher = outputs.student, outputs.teacher
        losses = self.base(student, targets)
        if self.feature:
            head = self.head_classes.to(student.logits[-1].device)
            boxes = [t["boxes"][head[t["labels"]]] for t in targets]
            masks = head_box_masks(boxes, student.proj_masks)
            losses["loss_fm_dis"] = masked_feature_loss(student.proj_features, teacher.proj_features, masks,
                                                        self.fm_normalize)
        if self.cls:
            index = self.head_class_index.to(student.logits[-1].device)
            layers = len(self.student_heads)
            for layer, suffix in zip(range(layers - len(self._cls_suffixes()), layers), self._cls_suffixes()):
                s_head, t_head = self.student_heads[layer], self.teacher_heads[layer]
                teacher_logits = t_head.class_logits(teacher.logits[layer])
                if self.shared_queries:
                    student_raw = s_head(teacher.query_features[layer].detach())
                else:
                    student_raw = student.logits[layer]
                losses["loss_cls_dis" + suffix] = class_distillation_loss(
                    s_head.class_logits(student_raw), teacher_logits, index, self.temperature)
        return losses


def teacher_student_forward(teacher: nn.Module):
    """``forward_fn(model, batch)`` for the engine: the student's output (with gradients) and the frozen
    teacher's (eval mode, no gradients), and the batch's targets."""

    def forward(model: nn.Module, batch: Any) -> tuple[TeacherStudentOutput, list[dict]]:
        with torch.no_grad():
            teacher_out = teacher(batch.images, batch.masks)
        return TeacherStudentOutput(model(batch.images, batch.masks), teacher_out), batch.targets

    return forward
