"""Step 3, ``stage=distill``: the unified model. Starts from the head-class expert (``stage.init_from``),
trains the same parameters on D_tail (``stage.train_ann``) with the Hungarian loss plus the distillation
terms of :mod:`stepwise.distill` from the frozen expert (``stage.teacher``, eval mode, no gradients); the
switches and weights are the root ``distill:`` block. Writes ``runs/<exp>/distill/`` like pretrain.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stepwise.stages.finetune import run_replay_stage


def load_teacher(cfg: Any, device: torch.device) -> nn.Module:
    """The frozen head-class expert: rebuilt from its checkpoint, eval mode, ``requires_grad`` off."""
    from stepwise.analysis.trained import load_trained_model

    teacher = load_trained_model(str(cfg.stage.teacher), device=device).model
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def decoder_class_heads(model: nn.Module) -> list[nn.Module]:
    """The class head of every decoder layer, first to last (not the two-stage encoder's)."""
    model = getattr(model, "module", model)
    return list(model.class_embed[:model.transformer.decoder.num_layers])


def run(cfg: Any) -> dict[str, Any] | None:
    """Distil and evaluate; returns the final val metrics."""
    from stepwise.data.smooth_tail import head_classes
    from stepwise.distill import DistillCriterion, teacher_student_forward

    teachers: dict[str, nn.Module] = {}

    def make_forward(cfg: Any, model: nn.Module, accelerator: Any):
        if "model" not in teachers:
            teachers["model"] = load_teacher(cfg, accelerator.device)
        accelerator.print(f"stepwise: teacher {cfg.stage.teacher} (frozen, eval mode)")
        return teacher_student_forward(teachers["model"])

    def make_criterion(cfg: Any, model: nn.Module, base: nn.Module, accelerator: Any, categories: Any):
        if "model" not in teachers:
            teachers["model"] = load_teacher(cfg, accelerator.device)
        head = torch.as_tensor(head_classes(categories.image_counts, int(cfg.stepwise.min_images)))
        d = cfg.distill
        return DistillCriterion(base, decoder_class_heads(model), decoder_class_heads(teachers["model"]), head,
                                feature=bool(d.feature), cls=bool(d.cls), shared_queries=bool(d.shared_queries),
                                lambda_fm=float(d.lambda_fm), lambda_cls=float(d.lambda_cls),
                                temperature=float(d.temperature), fm_normalize=str(d.fm_normalize),
                                cls_layers=str(d.cls_layers))

    return run_replay_stage(cfg, make_criterion=make_criterion, make_forward=make_forward)
