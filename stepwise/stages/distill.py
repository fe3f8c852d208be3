"""Step 3, ``stage=distill``: the unified model. Starts from the head-class expert (``stage.init_from``),
trains the same parameters on D_tail (``stage.train_ann``) with the Hungarian loss plus the distillation
terms of :mod:`stepwise.distill_losses` from the frozen expert (``stage.teacher``, eval mode, no gradients);
the switches and weights are the root ``distill:`` block. Writes ``runs/<exp>/distill/`` like pretrain.
The stage reads them as :class:`~stepwise.stage_settings.DistillSettings` (teacher, head classes, terms) and
the replay set as :class:`~stepwise.stage_settings.ReplaySettings` (:func:`stepwise.stages.parts.build_replay_stage`).
"""

from __future__ import annotations

from typing import Any

import torch

from stepwise.data.smooth_tail import head_classes
from stepwise.distill_losses import DistillCriterion, teacher_student_forward
from stepwise.models import Detector
from stepwise.stage_settings import DistillSettings
from stepwise.stages.parts import StageParts, build_replay_stage, make_trainer
from stepwise.trained import load_trained_model


def load_teacher(distill: DistillSettings, device: torch.device) -> Detector:
    """The frozen head-class expert ``distill.teacher``: rebuilt from its checkpoint, eval mode,
    ``requires_grad`` off."""
    teacher = load_trained_model(distill.teacher, device=device).detector
    teacher.model.eval()
    for p in teacher.model.parameters():
        p.requires_grad_(False)
    return teacher


def distill_criterion(parts: StageParts, teacher: Detector, distill: DistillSettings) -> DistillCriterion:
    """The student's set criterion plus the ``distill:`` block's terms (``distill.criterion_options()``) from
    ``teacher``; head classes are those with at least ``distill.min_images`` (``stepwise.min_images``)
    training images."""
    head = torch.as_tensor(head_classes(parts.categories.image_counts, distill.min_images))
    return DistillCriterion(parts.detector.criterion, parts.detector.class_heads, teacher.class_heads, head,
                            **distill.criterion_options())


def run(cfg: Any) -> dict[str, Any] | None:
    """Distil and evaluate; returns the final val metrics. The teacher is loaded after the student is built
    (the order the RNG streams of earlier runs followed) and before the criterion and forward that use it."""
    distill = DistillSettings.from_config(cfg)
    parts = build_replay_stage(cfg)
    teacher = load_teacher(distill, parts.accelerator.device)
    parts.accelerator.print(f"stepwise: teacher {distill.teacher} (frozen, eval mode)")
    return make_trainer(parts, distill_criterion(parts, teacher, distill), teacher_student_forward(teacher.model)).fit()
