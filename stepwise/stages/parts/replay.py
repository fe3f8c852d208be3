"""The body shared by the replay stages (``stage=finetune``, ``stage=distill``), read through their
:class:`~stepwise.stage_settings.ReplaySettings`: data of a replay set (``stage.train_ann``) with the full
training file's category map, sampled by step-wise RFS inside it (``stage.rfs``, rules
``stepwise.rfs[stage.replay_set]``, see :mod:`stepwise.data.samplers`; the factors used are written to
``<run_dir>/repeat_factors.json``), and the model from ``stage.init_from``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stepwise.data.annotation_index import AnnotationIndex
from stepwise.data.categories import CategoryMap
from stepwise.data.samplers import (GroupRule, dataset_classes, group_names, image_repeat_factors,
                                    repeat_factor_report, stepwise_class_factors)
from stepwise.engine import TrainSettings, make_accelerator
from stepwise.stage_settings import ReplaySettings
from stepwise.stages.parts.data import build_datasets, build_loaders, ensure_data
from stepwise.stages.parts.model import build_model
from stepwise.stages.parts.trainer import StageParts
from stepwise.utils.io import atomic_write_json


def full_categories(cfg: Any) -> Any:
    """The category map of the full training file ``data.train_ann``: a replay set holds a subset of the
    annotations, but class frequencies, counts (grouped heads, RFS bins, AP1..AP4) describe the data set."""
    return CategoryMap.from_index(AnnotationIndex.read(cfg.data.train_ann, "training annotation file"))


def replay_repeat_factors(replay: Any, train_ds: Any, categories: Any
                          ) -> tuple[torch.Tensor, int | None, dict[str, Any]]:
    """The replay stage's per-image sampling factors (len(train_ds),), its epoch length and the
    ``repeat_factors.json`` report. ``replay``: the stage's :class:`~stepwise.stage_settings.ReplaySettings`
    (or a config, read by ``ReplaySettings.from_config``).

    ``rfs``: "stepwise" (``rules``, groups from the full training file's image counts
    ``categories.image_counts``), "generic" (detectron2's rule with ``threshold`` for every class) or None
    (all factors 1); image factors rounded by ``rounding``. ``epoch``: "replay_set" (as many samples per epoch
    as the set has images, drawn from the shuffled repeated list: the public samplers' epoch) or "repeated"
    (the whole repeated list). The values were checked by the schema's rules (:mod:`stepwise.config_schema`:
    ``ReplayStage``, ``StepwiseRfs`` and the ``replay_set`` rule) when the settings were read.
    """
    settings = replay if isinstance(replay, ReplaySettings) else ReplaySettings.from_config(replay)
    mode = settings.rfs
    if mode == "stepwise":
        rules = settings.rules
        names = group_names(rules)
    else:  # generic: one rule over every class; uniform: no rule at all
        rules = (GroupRule(2 ** 62, settings.threshold, 0.5),) if mode == "generic" else ()
        names = ["all classes"] * (len(rules) + 1)
    classes = dataset_classes(train_ds)  # arrays (ImageClasses) for an LVISDetection
    f, r, group = stepwise_class_factors(classes, categories.image_counts, rules)
    factors = image_repeat_factors(classes, r, settings.rounding if mode else "ceil")
    epoch_length = len(train_ds) if settings.epoch == "replay_set" else None
    report = repeat_factor_report(classes, factors, f, r, group, names, categories.ids, categories.image_counts,
                                  epoch_length)
    report = {"mode": mode, "replay_set": settings.replay_set, "rounding": settings.rounding,
              "epoch": settings.epoch,
              "rules": [vars(rule) for rule in rules] if mode == "stepwise" else None,
              "threshold": settings.threshold if mode == "generic" else None, **report}
    return factors, epoch_length, report


def build_replay_stage(cfg: Any) -> StageParts:
    """Everything a replay stage trains with (its :class:`~stepwise.stage_settings.ReplaySettings`): data of
    ``train_ann`` with the full training file's category map, the sampler's factors (written to
    ``<run_dir>/repeat_factors.json``), and the model from ``init_from`` (root ``init_from`` wins:
    :func:`stepwise.config.starting_point`) with the ``reinit`` prefixes left fresh."""
    settings = TrainSettings.from_config(cfg)
    replay = ReplaySettings.from_config(cfg)
    run_dir = Path(cfg.run_dir)
    accelerator = make_accelerator(settings, run_dir)
    ensure_data(cfg, accelerator)
    categories = full_categories(cfg)
    train_ds, val_ds = build_datasets(cfg, train_ann=replay.train_ann, categories=categories)
    factors, epoch_length, report = replay_repeat_factors(replay, train_ds, categories)
    if accelerator.is_main_process:
        atomic_write_json(run_dir / "repeat_factors.json", report, indent=1)
    shares = ", ".join(f"{g['group']} {g['uniform_samples_per_epoch']:.0f} -> {g['samples_per_epoch']:.0f}"
                       for g in report["groups"] if g["images"])
    accelerator.print(f"stepwise: {replay.name} on {replay.train_ann}: {len(train_ds)} images, RFS "
                      f"{replay.rfs}: {report['epoch_length']:.0f} samples per epoch from a repeated list of "
                      f"{report['repeated_length']:.0f}; samples per epoch by group, uniform -> RFS: {shares}")
    train_loader, val_loader = build_loaders(cfg, train_ds, val_ds, repeat_factors=factors,
                                                    epoch_length=epoch_length)
    if replay.init_from is None:
        raise ValueError(f"stage={replay.name} needs weights to start from: set stage.init_from (or init_from=)")
    model = build_model(cfg, categories, accelerator, reinit=list(replay.reinit))
    return StageParts(cfg, settings, accelerator, categories, model, train_loader, val_loader)
