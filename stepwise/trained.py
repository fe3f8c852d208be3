"""A trained detector back from its checkpoint: the saved resolved config (plus overrides), the category
map and the model with its weights, ready for inference. Used by the stages (``stage=select`` scores with it,
``stage=distill`` loads its teacher), ``stepwise.evaluate checkpoint=``, ``stepwise.visualize`` and the
weight-norm plot.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from stepwise.checkpoint import CheckpointError, load_checkpoint, load_model_weights, resolve_checkpoint
from stepwise.config import ConfigError
from stepwise.data.categories import CategoryMap
from stepwise.models import Detector, build_detector


@dataclass
class TrainedModel:
    """What :func:`load_trained_model` returns.

    Attributes:
        path: the checkpoint file that was read.
        config: its saved resolved config with the overrides applied (struct mode).
        categories: the category map the model was trained with (contiguous index -> id, name, ...).
        detector: the network in eval mode on the requested device with its post-processing
            (:class:`stepwise.models.Detector`; no criterion: inference only).
        global_step: the optimizer step the checkpoint was written at (None when not recorded).
    """

    path: Path
    config: DictConfig
    categories: CategoryMap
    detector: Detector
    global_step: int | None

    @property
    def model(self) -> nn.Module:
        """The network (``detector.model``)."""
        return self.detector.model


def run_dir_of(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint belongs to: its folder, or the parent of a ``checkpoints/`` folder."""
    path = Path(checkpoint)
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def apply_overrides(config: Mapping[str, Any], overrides: Sequence[str], source: str = "checkpoint") -> DictConfig:
    """``config`` as a struct ``DictConfig`` with ``key=value`` overrides (YAML values) applied.

    Raises:
        ConfigError: an override is not ``key=value`` or names a key the config lacks (the key is named).
    """
    cfg = OmegaConf.create(dict(config))
    OmegaConf.set_struct(cfg, True)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise ConfigError(f"unknown or invalid config key {key!r} for the config saved in {source}: "
                              f"{str(err).splitlines()[0]}") from err
    return cfg


def load_trained_model(checkpoint: str | Path, overrides: Sequence[str] = (),
                       device: str | torch.device = "cpu") -> TrainedModel:
    """Rebuild the detector a checkpoint was trained as and load its weights (all of them, strictly).

    Args:
        checkpoint: a checkpoint file, or a run directory (its ``checkpoint_final.pt``, else the latest).
        overrides: ``key=value`` changes to the saved config (e.g. ``data.eval_scale=320``); ``model.*``
            changes must keep the weights' shapes.
        device: where the model goes.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, lacks ``model``/``categories``/``config``,
            or its weights do not fit the model its config describes (the file is named).
        ConfigError: a bad override.
    """
    path = resolve_checkpoint(checkpoint)
    state = load_checkpoint(path, required=("model", "categories", "config"))
    if not isinstance(state["config"], Mapping) or not isinstance(state["categories"], Mapping):
        raise CheckpointError(f"checkpoint {path} has no saved config or category map (config is "
                              f"{type(state['config']).__name__}, categories {type(state['categories']).__name__})")
    cfg = apply_overrides(state["config"], overrides, source=f"checkpoint {path}")
    try:
        categories = CategoryMap.from_dict(state["categories"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: invalid category map: {err}") from err

    model_cfg = cfg.model.copy()
    with open_dict(model_cfg):
        model_cfg.backbone_weights = None  # the checkpoint holds the backbone; don't fetch pretrained weights
    detector = build_detector(model_cfg, cfg.head, categories)  # inference: no criterion
    model = detector.model
    report = load_model_weights(model, state)
    if report.missing or report.mismatched:
        raise CheckpointError(f"checkpoint {path} does not fit the model its config describes "
                              f"({len(report.missing)} missing, {len(report.mismatched)} mismatched tensors):\n"
                              f"{str(report).replace(report.source, str(path))}")
    if report.unexpected:
        print(f"stepwise: checkpoint {path}: ignored {len(report.unexpected)} tensors the model does not have "
              f"({', '.join(report.unexpected[:5])})")
    model.to(device).eval()
    step = state.get("global_step")
    return TrainedModel(path=path, config=cfg, categories=categories, detector=detector,
                        global_step=int(step) if step is not None else None)
