"""Datasets and data loaders from the ``data`` config group (keeps the engine free of data details).

Config keys read (``configs/data/*.yaml``): ``train_ann``, ``val_ann``, ``train_image_root``,
``val_image_root``, the transform sizes of :func:`~stepwise.data.transforms.build_transforms`,
``batch_size``, ``num_workers``, ``rfs_threshold`` (null: every image once per epoch, shuffled),
``size_divisibility`` and ``allow_outside_root`` (image paths outside the image root; default false).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from stepwise.data.categories import CategoryMap
from stepwise.data.collate import collate
from stepwise.data.lvis_dataset import LVISDetection
from stepwise.data.samplers import RepeatFactorSampler, repeat_factors_from_dataset
from stepwise.data.transforms import build_transforms


def build_dataset(cfg_data: Any, split: str, train_transforms: bool | None = None,
                  categories: CategoryMap | None = None, ann_file: str | None = None) -> LVISDetection:
    """The ``split`` ('train' or 'val') dataset of ``cfg_data``; ``ann_file`` overrides the config's file
    (e.g. a step-wise replay set). Transforms are the train pipeline for 'train' unless
    ``train_transforms`` says otherwise."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train" if train_transforms is None else train_transforms
    return LVISDetection(ann_file or cfg_data[f"{split}_ann"], cfg_data[f"{split}_image_root"],
                         transforms=build_transforms(train, cfg_data), categories=categories,
                         allow_outside_root=bool(cfg_data.get("allow_outside_root", False)))


def _loader_kwargs(cfg_data: Any) -> dict[str, Any]:
    workers = int(cfg_data.get("num_workers", 0) or 0)
    return {"batch_size": int(cfg_data.get("batch_size", 2)), "num_workers": workers,
            "persistent_workers": workers > 0,
            "collate_fn": partial(collate, size_divisibility=int(cfg_data.get("size_divisibility", 1) or 1))}


def build_train_loader(dataset: LVISDetection, cfg_data: Any, seed: int = 0) -> DataLoader:
    """Training loader over a :class:`RepeatFactorSampler` (RFS with ``data.rfs_threshold``, or all
    factors 1 when it is null). Pass it through ``accelerator.prepare``; call ``loader.set_epoch(e)``
    before each epoch (see :mod:`stepwise.data.samplers` for the sharding behaviour)."""
    threshold = cfg_data.get("rfs_threshold", None)
    if threshold is None:
        factors = torch.ones(len(dataset), dtype=torch.float64)
    else:
        factors = repeat_factors_from_dataset(dataset, float(threshold))
    sampler = RepeatFactorSampler(factors, seed=seed, shuffle=True)
    return DataLoader(dataset, sampler=sampler, drop_last=False, **_loader_kwargs(cfg_data))


def build_eval_loader(dataset: LVISDetection, cfg_data: Any) -> DataLoader:
    """Sequential loader. Under Accelerate the last batches are padded with repeated images: gather
    predictions with ``accelerator.gather_for_metrics`` (drops them) or de-duplicate by ``image_id``."""
    return DataLoader(dataset, shuffle=False, drop_last=False, **_loader_kwargs(cfg_data))
