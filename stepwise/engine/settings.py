"""The training options (:class:`TrainSettings`), the Accelerator built from them, the training position,
the default forward and the weighted loss total, and the errors that stop a run."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from stepwise.config_schema import TrainingStage, check

ForwardFn = Callable[[nn.Module, Any], tuple[Any, Any]]
PredictFn = Callable[[nn.Module, Any], list[dict[str, Any]]]
EvaluateFn = Callable[[list[dict[str, Any]], Path], dict[str, float]]


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class NonFiniteStateError(NonFiniteLossError):
    """Gradients, predictions, parameters or optimizer state became NaN/inf; nothing of it is written."""


@dataclass
class TrainSettings:
    """The training options a stage config (``configs/stage/*.yaml``) carries, plus ``seed``/``resume``."""

    epochs: int = 1
    lr: float = 2e-4
    weight_decay: float = 1e-4
    lr_drop: Sequence[int] = ()
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1
    grad_accum: int = 1
    mixed_precision: str = "no"
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    log_every: int = 20
    max_steps: int | None = None
    trackers: Sequence[str] = ()
    seed: int = 42
    resume: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "TrainSettings":
        """Read ``cfg.stage.<field>`` (fields the stage config lacks keep their defaults), ``cfg.seed``, ``cfg.resume``."""
        stage = cfg.stage
        names = {f.name for f in fields(cls)} - {"seed", "resume"}
        values = {name: stage[name] for name in names if name in stage}
        for name in ("lr_drop", "trackers"):
            if name in values:
                values[name] = tuple(values[name] or ())
        settings = cls(**values, seed=int(cfg.seed), resume=bool(cfg.resume))
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise ValueError (:class:`~stepwise.config_schema.ConfigError`) naming the bad option: the training
        stage schema's rules (:class:`stepwise.config_schema.TrainingStage`, the ones ``load_config`` checks)
        applied to these fields, for settings that did not come through ``load_config``."""
        check("stage.", {f.name: getattr(self, f.name) for f in fields(self)}, TrainingStage)


def make_accelerator(settings: TrainSettings, run_dir: str | Path) -> Accelerator:
    """The Accelerator for one stage (precision, accumulation, trackers under ``run_dir``), seeded."""
    accelerator = Accelerator(
        # Without CUDA, say cpu=True: under torchrun (``accelerate launch --multi_gpu``) Accelerate otherwise
        # treats every CPU process as a lone single process instead of a gloo MULTI_CPU group.
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.grad_accum,
        log_with=list(settings.trackers) or None,
        project_dir=str(run_dir),
        step_scheduler_with_optimizer=False,
    )
    set_seed(settings.seed)
    return accelerator


def detection_forward(model: nn.Module, batch: Any) -> tuple[Any, Any]:
    """Default forward: an ``ImageBatch`` (images (B,3,H,W), masks (B,H,W)) -> (DetectorOutput, targets)."""
    return model(batch.images, batch.masks), batch.targets


def weighted_total(losses: dict[str, torch.Tensor], weight_dict: dict[str, float]) -> torch.Tensor:
    """Sum of ``weight_dict[k] * losses[k]`` over the losses that have a weight (DETR's convention)."""
    terms = [losses[k] * weight_dict[k] for k in losses if k in weight_dict]
    if not terms:
        raise KeyError(f"no loss has a weight: losses {sorted(losses)}, weight_dict {sorted(weight_dict)}")
    return torch.stack([t.float() for t in terms]).sum()




@dataclass
class Progress:
    """Where training stands: the next epoch to run, batches of it already done, optimizer steps so far."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
