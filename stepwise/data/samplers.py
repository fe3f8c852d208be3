"""Repeat factor sampling (RFS, Gupta et al. 2019, LVIS) for a finite epoch: detectron2's generic rule and
the step-wise method's per-group rules inside a replay set.

For each class c, ``f_c`` is the fraction of the sampled set's images that contain c (images without
annotations count in the denominator). Generic RFS (detectron2): ``r_c = max(1, sqrt(t / f_c))``. Step-wise
RFS (the step-wise paper's public samplers ``DistributedRepeatFactorReSampler_0`` / ``_1``): the classes are
grouped by their image count in the *full* training file and each group has its own rule
``r_c = max(1, (t_g / f_c) ** p_g)`` (a class in no group: r_c = 1), see :class:`GroupRule`. An image's
factor is the largest ``r_c`` over its classes (1 for an image without annotations), rounded up
(``rounding="ceil"``, the public code) or left fractional for the sampler's stochastic rounding
(``"stochastic"``, detectron2).

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

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler


@dataclass(frozen=True, eq=False)
class ImageClasses:
    """The contiguous labels of every image as arrays: image ``k``'s classes are
    ``labels[offsets[k]:offsets[k + 1]]``, ascending and unique. ``offsets`` (I + 1,), ``labels`` (L,) int64.

    Every RFS function below takes this or a sequence of per-image label sets (converted on entry), so the
    factors of a 100k-image set with 1.27M boxes are a few numpy operations."""

    offsets: np.ndarray
    labels: np.ndarray

    @classmethod
    def from_pairs(cls, image: np.ndarray, label: np.ndarray, num_images: int) -> "ImageClasses":
        """From (image, label) pairs, (n,) each; repeats are dropped."""
        image, label = np.asarray(image, dtype=np.int64), np.asarray(label, dtype=np.int64)
        if len(label) and label.min() < 0:
            raise ValueError(f"class labels must be >= 0, got {int(label.min())}")
        width = int(label.max()) + 1 if len(label) else 1
        pairs = np.unique(image * width + label)
        offsets = np.zeros(num_images + 1, dtype=np.int64)
        np.cumsum(np.bincount(pairs // width, minlength=num_images), out=offsets[1:])
        return cls(offsets, pairs % width)

    @classmethod
    def of(cls, image_classes: "ImageClasses | Sequence[Iterable[int]]") -> "ImageClasses":
        """``image_classes`` as :class:`ImageClasses` (a sequence of label sets is converted)."""
        if isinstance(image_classes, ImageClasses):
            return image_classes
        sets = [set(cs) for cs in image_classes]
        image = np.repeat(np.arange(len(sets)), [len(cs) for cs in sets])
        label = np.fromiter((c for cs in sets for c in cs), dtype=np.int64, count=len(image))
        return cls.from_pairs(image, label, len(sets))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def image(self) -> np.ndarray:
        """(L,) the image of each entry of ``labels``."""
        return np.repeat(np.arange(len(self)), np.diff(self.offsets))

    def images_per_class(self, num_classes: int = 0) -> np.ndarray:
        """(max(num_classes, largest label + 1),) int64: images holding each class."""
        return np.bincount(self.labels, minlength=num_classes)

    def max_per_image(self, values: np.ndarray, default: float = 1.0) -> np.ndarray:
        """(I,) float64: the largest ``values[c]`` over each image's classes, ``default`` without classes."""
        out = np.full(len(self), default, dtype=np.float64)
        filled = np.flatnonzero(np.diff(self.offsets) > 0)
        if len(filled):
            out[filled] = np.maximum.reduceat(np.asarray(values, dtype=np.float64)[self.labels],
                                              self.offsets[filled])
        return out


def repeat_factors_from_image_classes(image_classes: ImageClasses | Sequence[Iterable[int]],
                                      threshold: float = 0.001) -> torch.Tensor:
    """Per-image repeat factors (num_images,) float64 from the classes in each image."""
    if not threshold > 0:
        raise ValueError(f"RFS threshold must be > 0, got {threshold}")
    table = ImageClasses.of(image_classes)
    num_images = len(table)
    if num_images == 0:
        return torch.zeros(0, dtype=torch.float64)
    images_with = table.images_per_class()
    class_factor = np.ones(len(images_with), dtype=np.float64)
    present = images_with > 0
    class_factor[present] = np.maximum(1.0, np.sqrt(threshold / (images_with[present] / num_images)))
    return torch.from_numpy(table.max_per_image(class_factor))


def dataset_classes(dataset: Any) -> ImageClasses | list[set[int]]:
    """The classes of every image of ``dataset``: its ``class_table()`` when it has one (``LVISDetection``),
    else ``image_classes(i)`` image by image."""
    table = getattr(dataset, "class_table", None)
    return table() if table is not None else [dataset.image_classes(i) for i in range(len(dataset))]


def repeat_factors_from_dataset(dataset, threshold: float = 0.001) -> torch.Tensor:
    """Repeat factors (num_images,) of a dataset with ``image_classes(i)`` (e.g. ``LVISDetection``)."""
    return repeat_factors_from_image_classes(dataset_classes(dataset), threshold)


ROUNDINGS = ("ceil", "stochastic")


@dataclass(frozen=True)
class GroupRule:
    """One group of step-wise RFS: classes with at most ``max_images`` images in the full training file
    (and more than the previous rule's ``max_images``) get ``r_c = max(1, (threshold / f_c) ** power)``."""

    max_images: int
    threshold: float
    power: float

    @classmethod
    def parse(cls, rules: Sequence[Mapping[str, Any]], where: str = "rules") -> tuple["GroupRule", ...]:
        """Rules from config mappings ``{max_images, threshold, power}``, checked to ascend in ``max_images``."""
        out = []
        for k, rule in enumerate(rules):
            missing = {"max_images", "threshold", "power"} - set(rule)
            if missing:
                raise ValueError(f"{where}[{k}]: missing {sorted(missing)} (have {sorted(rule)})")
            out.append(cls(int(rule["max_images"]), float(rule["threshold"]), float(rule["power"])))
            if not (out[-1].threshold > 0 and out[-1].power > 0):
                raise ValueError(f"{where}[{k}]: threshold and power must be > 0, got {dict(rule)}")
            if k and out[-1].max_images <= out[-2].max_images:
                raise ValueError(f"{where}: max_images must ascend, got {[r.max_images for r in out]}")
        return tuple(out)


def group_names(rules: Sequence[GroupRule]) -> list[str]:
    """Names of the groups the rules define plus the last, untouched one: e.g. ``1-29 images``,
    ``30-100 images``, ``>100 images``."""
    names, low = [], 0
    for rule in rules:
        names.append(f"{low}-{rule.max_images} images" if low else f"<={rule.max_images} images")
        low = rule.max_images + 1
    return names + [f">{low - 1} images" if rules else "all"]


def class_groups(full_image_counts: Sequence[int], rules: Sequence[GroupRule]) -> np.ndarray:
    """(C,) int: the index of the first rule whose ``max_images`` covers each class's full-file image
    count; ``len(rules)`` for a class no rule covers (r = 1)."""
    counts = np.asarray(full_image_counts, dtype=np.int64)
    edges = np.asarray([r.max_images for r in rules], dtype=np.int64)
    return np.searchsorted(edges, counts, side="left")


def stepwise_class_factors(image_classes: ImageClasses | Sequence[Iterable[int]], full_image_counts: Sequence[int],
                           rules: Sequence[GroupRule]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class step-wise repeat factors of one replay set.

    Args:
        image_classes: per image of the replay set, its contiguous labels (or :class:`ImageClasses`).
        full_image_counts: (C,) image count of every class in the full training file (the groups).
        rules: the replay set's :class:`GroupRule` list.

    Returns:
        ``(f, r, group)``, each (C,): the fraction of the replay set's images containing the class (0 when
        absent), its factor ``r_c`` (1 for absent classes and classes in no group), its group index.
    """
    table = ImageClasses.of(image_classes)
    num_classes = len(full_image_counts)
    images = table.images_per_class(num_classes)[:num_classes]
    f = images / max(len(table), 1)
    group = class_groups(full_image_counts, rules)
    r = np.ones(num_classes, dtype=np.float64)
    for g, rule in enumerate(rules):
        take = (group == g) & (images > 0)
        r[take] = np.maximum(1.0, (rule.threshold / f[take]) ** rule.power)
    return f, r, group


def image_repeat_factors(image_classes: ImageClasses | Sequence[Iterable[int]], class_factors: np.ndarray,
                         rounding: str = "ceil") -> torch.Tensor:
    """(num_images,) float64: the largest class factor of each image (1 without classes), rounded up with
    ``rounding="ceil"``, fractional with ``"stochastic"`` (the sampler rounds it per epoch)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown RFS rounding {rounding!r}; choose one of {ROUNDINGS}")
    factors = ImageClasses.of(image_classes).max_per_image(class_factors)
    if rounding == "ceil":
        factors = np.ceil(factors - 1e-12)  # 1e-12: a factor computed as 2.0000000000000004 stays 2
    return torch.from_numpy(factors)


def repeat_factor_report(image_classes: ImageClasses | Sequence[Iterable[int]], factors: torch.Tensor,
                         f: np.ndarray, r: np.ndarray, group: np.ndarray, names: Sequence[str],
                         category_ids: Sequence[int], full_image_counts: Sequence[int],
                         epoch_length: int | None = None) -> dict[str, Any]:
    """What a replay stage over-sampled, for ``repeat_factors.json``.

    Each image is assigned to the group of its class with the largest r_c (ties: the lowest class index;
    images without classes to none). Per group: its classes, its images, how many of them are repeated, and
    the samples per epoch they get in expectation versus uniform sampling; per category id: group, full-file
    image count, f, r.

    Args:
        image_classes: per image, its contiguous labels (or :class:`ImageClasses`); factors: (num_images,)
            the image factors used.
        f, r, group: (C,) from :func:`stepwise_class_factors`; names: group names (``group_names``).
        category_ids, full_image_counts: (C,) from the full training file's category map.
        epoch_length: samples per epoch (None: the whole repeated list, ``factors.sum()``).
    """
    table = ImageClasses.of(image_classes)
    factors = factors.double().numpy()
    repeated = float(factors.sum())
    epoch = repeated if epoch_length is None else float(epoch_length)
    num_images = len(factors)
    # the class of each image that decides its group: the first (lowest) label reaching the image's largest r
    image = table.image
    r_of = np.asarray(r, dtype=np.float64)[table.labels]
    best = r_of == table.max_per_image(r)[image]
    first = np.flatnonzero(best)
    first = first[np.r_[True, image[first][1:] != image[first][:-1]]] if len(first) else first
    filled, image_group = image[first], np.asarray(group)[table.labels[first]]
    # np.bincount adds the weights in image order, as a loop over the images would
    per_group = {
        "images": np.bincount(image_group, minlength=len(names)),
        "repeated_images": np.bincount(image_group, weights=factors[filled] > 1, minlength=len(names)),
        "samples_per_epoch": np.bincount(image_group, weights=factors[filled] * epoch / max(repeated, 1e-12),
                                         minlength=len(names)),
        "uniform_samples_per_epoch": np.bincount(image_group, weights=np.full(len(filled), epoch / max(num_images, 1)),
                                                 minlength=len(names))}
    groups = [{"group": name, "classes": int((group == g).sum()), "images": int(per_group["images"][g]),
               "repeated_images": int(per_group["repeated_images"][g]),
               "samples_per_epoch": round(float(per_group["samples_per_epoch"][g]), 3),
               "uniform_samples_per_epoch": round(float(per_group["uniform_samples_per_epoch"][g]), 3)}
              for g, name in enumerate(names)]
    return {
        "num_images": num_images,
        "repeated_length": repeated,
        "epoch_length": epoch,
        "groups": groups,
        "categories": {str(cid): {"group": names[int(group[k])], "full_image_count": int(full_image_counts[k]),
                                  "f": float(f[k]), "r": float(r[k])}
                       for k, cid in enumerate(category_ids)},
    }


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
        epoch_length: keep only the first ``epoch_length`` indices of each epoch's (shuffled) list, as the
            step-wise paper's public samplers do (their epoch has as many samples as the set has images, drawn
            from the repeated list); None = the whole list.
    """

    def __init__(self, repeat_factors: torch.Tensor | Sequence[float], seed: int = 0, shuffle: bool = True,
                 epoch_length: int | None = None) -> None:
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64).reshape(-1)
        if not torch.isfinite(factors).all() or (factors < 0).any():
            raise ValueError("RepeatFactorSampler: repeat factors must be finite and >= 0")
        self.repeat_factors = factors
        self.seed = int(seed)
        self.shuffle = shuffle
        if epoch_length is not None and epoch_length < 1:
            raise ValueError(f"RepeatFactorSampler: epoch_length must be >= 1, got {epoch_length}")
        self.epoch_length = epoch_length
        self._int_part = torch.floor(factors)
        self._frac_part = factors - self._int_part
        self.set_epoch(0)

    @property
    def expected_length(self) -> float:
        """Expected number of indices per epoch, ``sum(repeat_factors)`` (at most ``epoch_length``)."""
        total = float(self.repeat_factors.sum())
        return total if self.epoch_length is None else min(total, float(self.epoch_length))

    def indices_for_epoch(self, epoch: int) -> torch.Tensor:
        """The epoch's full index list (long) - the same on every process for the same (seed, epoch)."""
        gen = _epoch_generator(self.seed, epoch)
        draws = torch.rand(self.repeat_factors.shape, generator=gen, dtype=torch.float64)
        reps = (self._int_part + (draws < self._frac_part).to(torch.float64)).long()
        indices = torch.repeat_interleave(torch.arange(len(reps)), reps)
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=gen)]
        return indices if self.epoch_length is None else indices[:self.epoch_length]

    def set_epoch(self, epoch: int) -> None:
        """Draw the rounding (and order) of ``epoch``; ``len`` and ``iter`` then describe that epoch."""
        self.epoch = int(epoch)
        self._indices = self.indices_for_epoch(self.epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices.tolist())

    def __len__(self) -> int:
        return len(self._indices)
