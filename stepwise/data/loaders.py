"""The one place that builds datasets, data loaders and evaluation subsets from the ``data`` config group.

Config keys read (``configs/data/*.yaml``): ``train_ann``, ``val_ann``, ``train_image_root``,
``val_image_root``, the transform sizes of :func:`~stepwise.data.transforms.build_transforms`,
``batch_size``, ``num_workers``, ``rfs_threshold`` (null: every image once per epoch, shuffled),
``rfs_epoch`` (with RFS: ``dataset`` = as many samples per epoch as the data set has images, ``repeated`` = the
whole repeated list), ``size_divisibility`` and ``allow_outside_root`` (image paths outside the image root).

Loaders are built for exact resume: :class:`SeededDataset` gives sample ``i`` of epoch ``e`` its own RNG seed
(so augmentations do not depend on worker assignment, skipped batches or prefetching), the sampler is
:class:`~stepwise.data.samplers.RepeatFactorSampler` (deterministic per ``(seed, epoch)``; all factors 1
without RFS), and workers are not persistent so ``set_epoch`` reaches them. Evaluation loaders are
sequential; the engine deals their fixed batches out to the processes (``engine.shard_eval_loader``).
"""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

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
                         # .get: configs saved in checkpoints written before the key existed lack it
                         allow_outside_root=bool(cfg_data.get("allow_outside_root", False)))


class SeededDataset(Dataset):
    """Wraps a dataset so item ``i`` is produced under RNG seeds derived from ``(seed, epoch, i)``.

    The global torch/numpy/python RNG states are restored afterwards, so data loading in the main process
    (``num_workers=0``) never shifts the training RNG (dropout) either. Other attributes (``categories``,
    ``image_ids``, ``image_classes``) are forwarded to the wrapped dataset.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0])
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        if name == "dataset" or name.startswith("__"):  # unpickling in workers looks these up first
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_fn(cfg_data: Any) -> Any:
    """The data group's ``collate`` with its ``size_divisibility``."""
    return partial(collate, size_divisibility=int(cfg_data["size_divisibility"] or 1))


def train_loader(dataset: Dataset, batch_size: int, seed: int, collate: Any = None, num_workers: int = 0,
                 repeat_factors: torch.Tensor | None = None, epoch_length: int | None = None) -> DataLoader:
    """A shuffled training loader that an interrupted-and-resumed run replays exactly.

    Args:
        dataset: any map-style dataset (wrapped in :class:`SeededDataset`).
        batch_size: per process.
        seed: the run's seed (sampler order and per-sample seeds).
        repeat_factors: (len(dataset),) RFS factors; None = each item once per epoch.
        epoch_length: samples per epoch taken from the shuffled repeated list (None: all of it).
    """
    factors = torch.ones(len(dataset), dtype=torch.float64) if repeat_factors is None else repeat_factors
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size,
                      sampler=RepeatFactorSampler(factors, seed=seed, shuffle=True, epoch_length=epoch_length),
                      collate_fn=collate,
                      num_workers=num_workers, persistent_workers=False, drop_last=False,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, collate: Any = None, num_workers: int = 0) -> DataLoader:
    """Sequential loader; the engine deals its batches out to the processes (``engine.shard_eval_loader``)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers,
                      drop_last=False, generator=torch.Generator().manual_seed(0))


def eval_subset(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` items of ``dataset`` (all of it for None): ``max_eval_images``, ``max_images``."""
    return dataset if limit is None else Subset(dataset, range(min(int(limit), len(dataset))))


def build_train_loader(dataset: Dataset, cfg_data: Any, seed: int, repeat_factors: torch.Tensor | None = None,
                       epoch_length: int | None = None) -> DataLoader:
    """:func:`train_loader` with the data group's batch size, workers and collate. ``repeat_factors``
    (len(dataset),): the sampler's per-image factors (a replay stage's step-wise RFS); None: generic RFS
    with ``data.rfs_threshold`` (every image once per epoch when that is null), an epoch of ``len(dataset)``
    samples with ``data.rfs_epoch=dataset`` (the whole repeated list with ``repeated``).
    ``epoch_length``: samples per epoch drawn from the shuffled repeated list (None: all of it)."""
    if repeat_factors is None and cfg_data["rfs_threshold"] is not None:
        repeat_factors = repeat_factors_from_dataset(dataset, float(cfg_data["rfs_threshold"]))
        if cfg_data["rfs_epoch"] == "dataset":  # RFS changes the mix of an epoch, not its number of steps
            epoch_length = len(dataset)
    return train_loader(dataset, int(cfg_data["batch_size"]), int(seed), collate_fn(cfg_data),
                        int(cfg_data["num_workers"]), repeat_factors, epoch_length)


def build_eval_loader(dataset: Dataset, cfg_data: Any, batch_size: int | None = None,
                      limit: int | None = None) -> DataLoader:
    """:func:`eval_loader` over the first ``limit`` items (:func:`eval_subset`), ``batch_size`` images a
    batch (None: ``data.batch_size``), the data group's workers and collate."""
    return eval_loader(eval_subset(dataset, limit), int(batch_size or cfg_data["batch_size"]),
                       collate_fn(cfg_data), int(cfg_data["num_workers"]))
