"""The :class:`~stepwise.engine.Trainer` of every training stage, assembled from the parts the stage built
(:class:`StageParts`): Deformable DETR's AdamW groups, the detector's criterion, evaluation by the LVIS
metrics through a :class:`~stepwise.predictor.Predictor`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from stepwise.engine import ForwardFn, Trainer, TrainSettings, detection_forward
from stepwise.models import Detector, param_groups
from stepwise.predictor import Predictor, lvis_evaluator


@dataclass
class StageParts:
    """What a training stage builds before its Trainer (every stage the same way): ``detector`` is the
    network with its criterion and post-processing (:func:`stepwise.stages.parts.build_model`)."""

    cfg: Any
    settings: TrainSettings
    accelerator: Accelerator
    categories: Any
    detector: Detector
    train_loader: DataLoader
    val_loader: DataLoader

    @property
    def model(self) -> nn.Module:
        """The network (``detector.model``)."""
        return self.detector.model


def make_trainer(parts: StageParts, criterion: Any = None, forward_fn: ForwardFn = detection_forward) -> Trainer:
    """The Trainer of every training stage: Deformable DETR's AdamW groups from ``cfg.stage``, evaluation by
    the LVIS metrics on ``data.val_ann`` (AP1..AP4 counts from ``data.train_ann``); ``criterion`` default
    the detector's own, ``forward_fn`` default the detector on an ``ImageBatch``."""
    cfg, model, accelerator = parts.cfg, parts.model, parts.accelerator
    return Trainer(
        accelerator, model, criterion if criterion is not None else parts.detector.criterion,
        parts.train_loader, parts.settings, Path(cfg.run_dir), param_groups=param_groups(model, cfg.stage),
        val_loader=parts.val_loader, predict_fn=Predictor(parts.detector, parts.categories).predict_batch,
        evaluate_fn=lvis_evaluator(cfg.data.val_ann, cfg.data.train_ann), forward_fn=forward_fn,
        categories=parts.categories, config=cfg)
