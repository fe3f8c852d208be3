"""The data every training stage reads: the built-in data sets generated on first use, the (train, val)
datasets and their loaders (:mod:`stepwise.data.loaders`), checked first (:mod:`.preflight`)."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from stepwise.data.loaders import build_dataset, build_eval_loader, build_train_loader
from stepwise.data.synthetic import ensure_synthetic
from stepwise.stages.parts.preflight import preflight


def ensure_data(cfg: Any, accelerator: Accelerator) -> None:
    """Generate the built-in data (``data.name`` synthetic or emoji_lvis) on first use (main process; the
    others wait)."""
    if cfg.data.name in ("synthetic", "emoji_lvis"):
        if accelerator.is_main_process:
            ensure_builtin_data(cfg.data)
        accelerator.wait_for_everyone()


def ensure_builtin_data(data: Any) -> None:
    """Generate ``data`` (a data config) under ``data.root`` when it is a built-in data set not made yet."""
    negatives = data.get("negatives", "preset")  # configs saved before the key existed: the preset's
    if data.name == "synthetic":
        ensure_synthetic(data.root, data.preset, int(data.synthetic_seed), negatives=negatives)
    elif data.name == "emoji_lvis":
        if negatives != "preset":
            raise ValueError(f"data.negatives={negatives} is an option of data=synthetic; the emoji benchmark "
                             f"sets its own negatives (its preset's neg_per_image): leave data.negatives=preset")
        from stepwise.data.emoji_lvis import ensure_emoji

        ensure_emoji(data.root, data.preset, int(data.synthetic_seed))


def build_datasets(cfg: Any, train_ann: str | None = None, categories: Any = None) -> tuple[Any, Any]:
    """(train, val) ``LVISDetection``; ``train_ann`` overrides the training file; val shares train's
    category map, or both use ``categories`` when given (a replay set: the full training file's map)."""
    train = build_dataset(cfg.data, "train", ann_file=train_ann, categories=categories)
    val = build_dataset(cfg.data, "val", categories=train.categories)
    return train, val


def build_loaders(cfg: Any, train_ds: Any, val_ds: Any, repeat_factors: torch.Tensor | None = None,
                  epoch_length: int | None = None) -> tuple[DataLoader, DataLoader]:
    """Training loader (:func:`~stepwise.data.loaders.build_train_loader`: ``repeat_factors``
    (len(train_ds),) or generic RFS with ``data.rfs_threshold`` and ``data.rfs_epoch``, ``epoch_length``
    samples per epoch) and evaluation loader (``stage.eval_batch_size``; first ``stage.max_eval_images``
    images when set). First refuses an empty training set and (with ``data.preflight``) runs :func:`preflight`."""
    check_not_empty(train_ds)
    limit = cfg.stage.max_eval_images
    if cfg.data.preflight:
        preflight(cfg, train_ds, val_ds, val_indices=None if limit is None else range(min(int(limit), len(val_ds))))
    train = build_train_loader(train_ds, cfg.data, int(cfg.seed), repeat_factors, epoch_length)
    return train, build_eval_loader(val_ds, cfg.data, cfg.stage.eval_batch_size, limit)


def check_not_empty(train_ds: Any) -> None:
    """ValueError naming the file when a training set has no image or no usable box (nothing to learn)."""
    source = getattr(train_ds, "ann_file", "the training set")
    if len(train_ds) == 0:
        raise ValueError(f"training annotation file {source} has no images: nothing to train on")
    boxes = getattr(train_ds, "num_boxes", None)
    if boxes == 0:
        dropped = {name: getattr(train_ds, attr, 0) for name, attr in (
            ("crowd", "num_crowd_skipped"), ("width or height <= 0", "num_degenerate_dropped"),
            ("outside the image", "num_outside_dropped"), ("ignore", "num_ignored"))}
        why = ", ".join(f"{n} {name}" for name, n in dropped.items() if n)
        raise ValueError(f"training annotation file {source} has no usable boxes in its {len(train_ds)} images"
                         f"{f' (skipped: {why})' if why else ''}: nothing to train on")
