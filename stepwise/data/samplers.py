"""Repeat factor sampling (RFS, Gupta et al. 2019, LVIS) with detectron2's semantics, for a finite epoch.

For each class c, ``f_c`` is the fraction of training images that contain c (images without annotations
count in the denominator); its repeat factor is ``r_c = max(1, sqrt(t / f_c))``; an image's factor is the
largest ``r_c`` over its classes (1 for an image without annotations).

detectron2's ``RepeatFactorTrainingSampler`` is infinite. Here an epoch is finite: at ``set_epoch(e)`` each
image ``i`` is repeated ``floor(r_i) + Bernoulli(frac(r_i))`` times, with a generator seeded by
``(seed, e)`` alone, and the list is shuffled with the same generator. So every process builds the SAME
list for an epoch and ``len(sampler)`` is that list's length (it changes from epoch to epoch; its
expectation is ``sum(r_i)``, :attr:`RepeatFactorSampler.expected_length`).

Under Accelerate (``accelerator.prepare(loader)`` or ``prepare_data_loader``) the loader's batch sampler
is wrapped in ``BatchSamplerShard``: with ``split_batches=False`` process p takes batches p, p+n, p+2n, ...
of the shared list, so the shards are disjoint and together cover the epoch's list. When the number of
batches or the last batch does not fill all processes, ``even_batches=True`` (the default) completes the
last round with indices from the START of the same epoch's list (those few images are seen twice that
epoch); ``even_batches=False`` leaves the shards uneven instead. ``DataLoaderShard.set_epoch(e)`` reaches
this sampler (``batch_sampler.batch_sampler.sampler.set_epoch``), and ``DataLoaderShard.__iter__`` calls it
with its own epoch counter, which advances by one per full pass. The sampler has no ``generator``
attribute on purpose: Accelerate would otherwise replace/synchronise it, and ``use_seedable_sampler`` only
concerns ``RandomSampler``.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


def repeat_factors_from_image_classes(image_classes: Sequence[Iterable[int]], threshold: float = 0.001
                                      ) -> torch.Tensor:
    """Per-image repeat factors (num_images,) float64 from the set of classes in each image."""
    if not threshold > 0:
        raise ValueError(f"RFS threshold must be > 0, got {threshold}")
    classes = [set(c) for c in image_classes]
    num_images = len(classes)
    if num_images == 0:
        return torch.zeros(0, dtype=torch.float64)
    images_with: dict[int, int] = {}
    for cs in classes:
        for c in cs:
            images_with[c] = images_with.get(c, 0) + 1
    class_factor = {c: max(1.0, math.sqrt(threshold / (n / num_images))) for c, n in images_with.items()}
    return torch.tensor([max((class_factor[c] for c in cs), default=1.0) for cs in classes], dtype=torch.float64)


def repeat_factors_from_dataset(dataset, threshold: float = 0.001) -> torch.Tensor:
    """Repeat factors (num_images,) of a dataset with ``image_classes(i)`` (e.g. ``LVISDetection``)."""
    return repeat_factors_from_image_classes([dataset.image_classes(i) for i in range(len(dataset))], threshold)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch): identical on every process."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class RepeatFactorSampler(Sampler[int]):
    """Finite-epoch repeat factor sampler with stochastic rounding re-drawn per epoch (see module doc).

    Args:
        repeat_factors: (num_images,) factors >= 0 (all ones: a plain seeded shuffle).
        seed: shared by all processes.
        shuffle: shuffle the epoch's list; otherwise indices come in ascending order.
    """

    def __init__(self, repeat_factors: torch.Tensor | Sequence[float], seed: int = 0, shuffle: bool = True) -> None:
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(factors).all() or (factors < 0).any():
            raise ValueError("RepeatFactorSampler: repeat factors must be finite and >= 0")
        self.repeat_factors = factors
        self.seed = int(seed)
        self.shuffle = shuffle
        self._int_part = torch.floor(factors)
        self._frac_part = factors - self._int_part
        self.set_epoch(0)

    @property
    def expected_length(self) -> float:
        """Expected number of indices per epoch, ``sum(repeat_factors)``."""
        return float(self.repeat_factors.sum())

    def indices_for_epoch(self, epoch: int) -> torch.Tensor:
        """The epoch's full index list (long) - the same on every process for the same (seed, epoch)."""
        gen = _epoch_generator(self.seed, epoch)
        draws = torch.rand(self.repeat_factors.shape, generator=gen, dtype=torch.float64)
        reps = (self._int_part + (draws < self._frac_part).to(torch.float64)).long()
        indices = torch.repeat_interleave(torch.arange(len(reps)), reps)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=gen)]
        return indices

    def set_epoch(self, epoch: int) -> None:
        """Draw the rounding (and order) of ``epoch``; ``len`` and ``iter`` then describe that epoch."""
        self.epoch = int(epoch)
        self._indices = self.indices_for_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)
