"""The built-in long-tailed detection data set: deterministic, LVIS v1 format, no download.

Every class is a learnable visual pattern (shape x colour x texture) drawn on a mildly textured, noisy
background. Training instance counts follow a Zipf-Mandelbrot law n_k ~ (k + 1 + b)^-s over the frequency
rank k, pinned so the head class has ``max_instances`` and the rarest ``min_instances``; a few tail
classes are "twins" of head classes (same shape and colour with another texture, or the same pattern in
a near hue). The val split holds every class (at least ``val_min_instances`` each) so AP_r is measurable.

Annotation is federated like LVIS on both splits: ``neg_category_ids`` lists a random subset of the
classes verified absent from the image; for a small fraction of images one instance of a class present
twice or more is drawn but left unannotated, and that class goes into ``not_exhaustive_category_ids``.

How many absent classes the val split lists (``negatives``, ``data.negatives``): ``preset`` (the default,
what every recorded run was scored with) lists the preset's ``neg_fraction`` of them (half, on every preset
but ``large``: ~39 of 80 classes per image on ``study``); ``lvis`` lists each absent class with probability
:data:`LVIS_NEG_SHARE` = 0.77 %, the density of LVIS's val annotation; a number in [0, 1] is such a share.
The density decides how a confident detection of an absent class is scored: federated evaluation counts
it as a false positive only where the class is listed. With ``negatives`` other than ``preset`` the data
directory is unchanged and an extra file ``annotations/val_neg-<lvis|share>.json`` holds the val split with
those negatives (same images, boxes and ids; :func:`val_file_name`, written by :func:`ensure_synthetic`).

Generation has two steps: :func:`plan_dataset` decides everything (classes, counts, boxes, federated
ids) without drawing a pixel; :func:`generate` renders the plan to PNG files and writes
``annotations/{train,val}.json``. The same seed gives the same bytes.

Layout of a generated directory::

    DIR/images/train2017/000000000001.png   (train images; val images under val2017/)
    DIR/annotations/train.json, val.json     (LVIS v1; images have coco_url, no file_name)
    DIR/synthetic.json                        (preset, seed, class designs, summary; written last)
"""

from __future__ import annotations

import colorsys
import ctypes
import glob
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from stepwise.utils.bins import instance_bin_index

from stepwise.utils.io import atomic_write_json, read_json
from stepwise.utils.signals import exit_on_signals, raise_for_signal

FORMAT_VERSION = 1
URL_ROOT = "http://synthetic.stepwise"
# LVIS's density of verified-absent classes: an image's neg_category_ids hold this share of the classes it
# does not contain. Measured on the LVIS API's published val sample (github lvis-dataset/lvis-api,
# data/lvis_val_100.json: 100 randomly sampled LVIS v0.5 val images, 1,230 categories): 942 negative labels
# over 122,701 absent (image, class) pairs = 0.768 %; per image 9.42 negatives (median 8, range 0-15) next to
# 2.99 positive classes. docs/faithfulness.md, "Evaluation".
LVIS_NEG_SHARE = 942 / 122701
NEGATIVES = ("preset", "lvis")  # or a share in [0, 1]
SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
META_FILE = "synthetic.json"

SHAPES = ("circle", "square", "triangle", "ring", "cross", "star", "diamond", "frame", "halfdisk", "hourglass")
COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "lime": (150, 230, 40),
    "green": (20, 140, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 80, 225),
    "purple": (130, 50, 200),
    "magenta": (230, 40, 200),
    "pink": (255, 150, 190),
    "brown": (125, 75, 25),
    "black": (20, 20, 20),
}
TEXTURES = ("solid", "striped", "dotted")

# LVIS frequency thresholds on training image counts, and the names of the BAGS instance-count bins
# (stepwise.utils.bins).
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100
INSTANCE_BIN_NAMES = ("<10", "10-100", "100-1000", ">=1000")

Box = tuple[int, int, int, int]  # x, y, w, h in integer pixels


@dataclass(frozen=True)
class Preset:
    """Size and difficulty of a synthetic data set.

    The number of images follows from the instance counts: objects are dealt to images in groups of
    ``objects_per_image`` (uniform), so train images ~= sum(train counts) / mean objects per image.
    ``required_frequencies`` / ``required_instance_bins`` are what the preset guarantees to be
    non-empty; :func:`plan_dataset` raises if a plan breaks them.
    """

    name: str
    num_classes: int
    max_instances: int  # train instances of the most frequent class
    min_instances: int  # train instances of the rarest class
    zipf_offset: float  # b in n_k ~ (k + 1 + b)^-s; larger b flattens the head
    objects_per_image: tuple[int, int]  # inclusive range, annotated + unannotated
    image_size: tuple[int, int]  # inclusive range of width and of height, px
    object_size: tuple[int, int]  # range of an object's longer side, px (shrunk to fit crowded images)
    val_fraction: float  # val instances of a class = max(val_min_instances, round(val_fraction * train))
    val_min_instances: int
    neg_fraction: float  # share of the absent classes listed in neg_category_ids
    not_exhaustive_fraction: float  # share of images with one instance left unannotated
    twin_fraction: float  # share of classes that are tail twins of head classes
    required_frequencies: str  # subset of "rcf"
    required_instance_bins: tuple[int, ...]  # indices into INSTANCE_BIN_NAMES


PRESETS: dict[str, Preset] = {
    # For tests: ~150 train / ~30 val images of 64-96 px, 10 classes, generated in about a second. The
    # head class sits in >100 train images, so r, c and f are all non-empty; with ~500 train instances
    # no class reaches 1,000, so tiny guarantees the <10, 10-100 and 100-1000 instance bins only.
    "tiny": Preset(
        name="tiny", num_classes=10, max_instances=300, min_instances=2, zipf_offset=3.0,
        objects_per_image=(1, 6), image_size=(64, 96), object_size=(12, 40),
        val_fraction=0.1, val_min_instances=8, neg_fraction=0.5, not_exhaustive_fraction=0.05,
        twin_fraction=0.2, required_frequencies="rcf", required_instance_bins=(0, 1, 2),
    ),
    # The CPU demo: ~2,300 train / ~320 val images of 128-160 px, 40 classes, every bin non-empty.
    "small": Preset(
        name="small", num_classes=40, max_instances=1500, min_instances=4, zipf_offset=30.0,
        objects_per_image=(1, 6), image_size=(128, 160), object_size=(16, 72),
        val_fraction=0.12, val_min_instances=8, neg_fraction=0.5, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2, 3),
    ),
    # The ablation-study proxy (configs/data/synthetic_study.yaml, docs/study.md): ~1,800 train / ~870 val
    # images of 72-96 px, 80 classes (32 rare, 33 common, 15 frequent), so that a CPU epoch is short, APr
    # averages over many classes and the val split is large (>= 20 instances of every class).
    "study": Preset(
        name="study", num_classes=80, max_instances=600, min_instances=3, zipf_offset=20.0,
        objects_per_image=(1, 5), image_size=(72, 96), object_size=(14, 40),
        val_fraction=0.3, val_min_instances=20, neg_fraction=0.5, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2),
    ),
    # For GPU runs: ~30,000 train / ~3,500 val images of 160-224 px, 300 classes.
    "large": Preset(
        name="large", num_classes=300, max_instances=4000, min_instances=2, zipf_offset=150.0,
        objects_per_image=(1, 6), image_size=(160, 224), object_size=(16, 96),
        val_fraction=0.08, val_min_instances=8, neg_fraction=0.3, not_exhaustive_fraction=0.03,
        twin_fraction=0.15, required_frequencies="rcf", required_instance_bins=(0, 1, 2, 3),
    ),
}


@dataclass(frozen=True)
class ClassSpec:
    """One category: its LVIS id (1..C, alphabetical by name), frequency rank (0 = most instances) and look."""

    category_id: int
    rank: int
    name: str
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    texture: str
    twin_of: str | None = None  # name of the head class this tail class imitates

    @property
    def definition(self) -> str:
        return f"a {self.colour.replace('_', ' ')} {self.shape} with a {self.texture} fill"


@dataclass
class ObjectPlan:
    """One drawn object; ``box`` is (x, y, w, h) in integer pixels. Unannotated objects are drawn only."""

    category_id: int
    box: Box
    annotated: bool = True


@dataclass
class ImagePlan:
    """One image: size, objects in drawing order, and its federated category lists."""

    id: int
    split: str
    width: int
    height: int
    objects: list[ObjectPlan]
    neg_category_ids: list[int] = field(default_factory=list)
    not_exhaustive_category_ids: list[int] = field(default_factory=list)

    @property
    def relative_path(self) -> str:
        """Path under ``images/``, i.e. the last two parts of ``coco_url``."""
        return f"{SPLIT_FOLDERS[self.split]}/{self.id:012d}.png"


@dataclass
class DatasetPlan:
    """Everything about a data set except its pixels."""

    preset: Preset
    seed: int
    classes: list[ClassSpec]  # ordered by category id
    splits: dict[str, list[ImagePlan]]

    def train_counts(self) -> tuple[dict[int, int], dict[int, int]]:
        """(image_count, instance_count) per category id over the annotated train objects."""
        images: Counter[int] = Counter()
        instances: Counter[int] = Counter()
        for img in self.splits["train"]:
            cats = [o.category_id for o in img.objects if o.annotated]
            instances.update(cats)
            images.update(set(cats))
        return dict(images), dict(instances)

    def categories(self) -> list[dict]:
        """The LVIS ``categories`` block, with frequency and counts from the train split."""
        image_count, instance_count = self.train_counts()
        out = []
        for c in self.classes:
            n_img = image_count.get(c.category_id, 0)
            if n_img == 0:
                raise ValueError(f"synthetic category {c.category_id} ({c.name}) has no annotated train image")
            out.append({
                "id": c.category_id,
                "name": c.name,
                "synset": f"{c.name}.n.01",
                "synonyms": [c.name],
                "def": c.definition,
                "frequency": frequency_of(n_img),
                "image_count": n_img,
                "instance_count": instance_count.get(c.category_id, 0),
            })
        return out

    def summary(self) -> dict:
        """Counts per split, classes per frequency bin and per training instance-count bin."""
        cats = self.categories()
        freq = Counter(c["frequency"] for c in cats)
        bins = Counter(instance_bin(c["instance_count"]) for c in cats)
        out = {
            "preset": self.preset.name,
            "seed": self.seed,
            "classes": len(cats),
            "frequency_bins": {k: freq.get(k, 0) for k in "rcf"},
            "instance_bins": {name: bins.get(i, 0) for i, name in enumerate(INSTANCE_BIN_NAMES)},
            "twins": sum(c.twin_of is not None for c in self.classes),
        }
        for split, images in self.splits.items():
            objs = [o for img in images for o in img.objects]
            out[split] = {
                "images": len(images),
                "instances": sum(o.annotated for o in objs),
                "unannotated": sum(not o.annotated for o in objs),
                "classes_present": len({o.category_id for o in objs if o.annotated}),
                "min_instances_per_class": min(Counter(o.category_id for o in objs if o.annotated).values()),
            }
        return out


def frequency_of(image_count: int) -> str:
    """LVIS frequency letter from a training image count: r (1-10), c (11-100), f (>100)."""
    if image_count < 1:
        raise ValueError(f"a category needs at least one training image, got {image_count}")
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    return "c" if image_count <= COMMON_MAX_IMAGES else "f"


def instance_bin(instance_count: int) -> int:
    """Index of the BAGS instance-count bin (<10, 10-100, 100-1000, >=1000) of a class (``INSTANCE_BIN_NAMES``)."""
    return instance_bin_index(instance_count)


def get_preset(preset: str | Preset) -> Preset:
    """Look a preset up by name (error lists the known ones) or pass a :class:`Preset` through."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; known: {', '.join(PRESETS)}")
    return PRESETS[preset]


# ----------------------------------------------------------------------------------------------------
# Planning (no pixels)


def plan_instance_counts(preset: str | Preset) -> np.ndarray:
    """Train instances per class by frequency rank, (C,) int, non-increasing; Zipf-Mandelbrot.

    n_k = max * ((1 + b) / (k + 1 + b))^s with s chosen so that n_{C-1} = min.
    """
    p = get_preset(preset)
    c, b = p.num_classes, p.zipf_offset
    if c < 2 or not 1 <= p.min_instances <= p.max_instances:
        raise ValueError(f"preset {p.name!r}: need >= 2 classes and 1 <= min_instances <= max_instances")
    s = math.log(p.max_instances / p.min_instances) / math.log((c + b) / (1 + b))
    k = np.arange(c)
    return np.maximum(np.round(p.max_instances * ((1 + b) / (k + 1 + b)) ** s), p.min_instances).astype(int)


def _near_hue(rgb: tuple[int, int, int], shift: float) -> tuple[int, int, int]:
    h, s, v = colorsys.rgb_to_hsv(*(x / 255 for x in rgb))
    r, g, b = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return (round(r * 255), round(g * 255), round(b * 255))


def design_classes(preset: str | Preset, rng: np.random.Generator) -> list[ClassSpec]:
    """Give every frequency rank a look; returns the classes ordered by category id (alphabetical names).

    Ordinary classes take distinct (shape, colour) pairs first, each with a random texture, and reuse a
    pair with another texture only when the pairs run out. Twins are tail classes (last third of the
    ranks) copying a head class (first third): same shape and colour with another texture, or the same
    shape and texture in a hue shifted by ~22 degrees.
    """
    p = get_preset(preset)
    c = p.num_classes
    capacity = len(SHAPES) * len(COLOURS) * len(TEXTURES)
    if c > capacity:
        raise ValueError(f"preset {p.name!r}: {c} classes but only {capacity} shape x colour x texture designs")
    n_twins = min(round(c * p.twin_fraction), c // 3)
    heads = list(range(max(1, c // 3)))
    twin_ranks = sorted(rng.choice(np.arange(c - c // 3, c), size=n_twins, replace=False).tolist())

    # Pair i = (shape i % S, colour (i % S + i // S) % K) enumerates all S*K pairs so that any run of
    # consecutive pairs spreads evenly over shapes and colours; random relabelling varies it by seed.
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))]
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))]
    n_s, n_k = len(shapes), len(colours)
    pairs = [(shapes[i % n_s], colours[(i % n_s + i // n_s) % n_k]) for i in range(n_s * n_k)]
    texture_orders = [rng.permutation(len(TEXTURES)) for _ in pairs]
    combos = [(shape, colour, TEXTURES[texture_orders[i][j]])
              for j in range(len(TEXTURES)) for i, (shape, colour) in enumerate(pairs)]

    looks: dict[int, tuple[str, str, tuple[int, int, int], str, int | None]] = {}
    ordinary = [r for r in range(c) if r not in twin_ranks]
    for r, (shape, colour, texture) in zip(ordinary, combos):
        looks[r] = (shape, colour, COLOURS[colour], texture, None)
    used = {(v[0], v[1], v[3]) for v in looks.values()}

    twin_heads = rng.permutation(heads).tolist()
    for i, r in enumerate(twin_ranks):
        h = twin_heads[i % len(twin_heads)]
        shape, colour, rgb, texture, _ = looks[h]
        free = [t for t in TEXTURES if (shape, colour, t) not in used]
        hue_colour = f"near_{colour}"
        want_hue = (i % 2 == 1 or not free) and colour != "black" and (shape, hue_colour, texture) not in used
        if want_hue:
            shift = 0.06 if rng.random() < 0.5 else -0.06
            look = (shape, hue_colour, _near_hue(rgb, shift), texture, h)
        elif free:
            look = (shape, colour, rgb, free[int(rng.integers(len(free)))], h)
        else:  # no twin possible for this head: fall back to the next unused ordinary design
            shape, colour, texture = next(x for x in combos if x not in used)
            look = (shape, colour, COLOURS[colour], texture, None)
        looks[r] = look
        used.add((look[0], look[1], look[3]))

    names = {r: f"{v[1]}_{v[3]}_{v[0]}" for r, v in looks.items()}
    by_name = sorted(range(c), key=lambda r: names[r])
    classes = []
    for cid, r in enumerate(by_name, start=1):
        shape, colour, rgb, texture, head = looks[r]
        classes.append(ClassSpec(cid, r, names[r], shape, colour, tuple(int(x) for x in rgb), texture,
                                 names[head] if head is not None else None))
    return classes


def _overlap_ok(box: Box, boxes: list[Box], limit: float) -> bool:
    """True when ``box`` covers at most ``limit`` of the smaller box of every pair (low overlap)."""
    x, y, w, h = box
    for bx, by, bw, bh in boxes:
        iw = min(x + w, bx + bw) - max(x, bx)
        ih = min(y + h, by + bh) - max(y, by)
        if iw > 0 and ih > 0 and iw * ih > limit * min(w * h, bw * bh):
            return False
    return True


def _place_objects(rng: np.random.Generator, k: int, width: int, height: int, p: Preset) -> list[Box]:
    """k boxes (x, y, w, h) inside a width x height image with low mutual overlap.

    The longer side is log-uniform in ``object_size``, capped so k objects fill at most ~45% of the
    image; an object that finds no free spot in 15 tries is shrunk by 20% and tried again.
    """
    cap = max(8, min(p.object_size[1], int(math.sqrt(0.45 * width * height / k)), min(width, height) - 2))
    lo = min(p.object_size[0], cap)
    boxes: list[Box] = []
    for _ in range(k):
        side = math.exp(rng.uniform(math.log(lo), math.log(cap))) if cap > lo else float(lo)
        aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))  # w / h
        placed = None
        for attempt in range(60):
            if attempt and attempt % 15 == 0:
                side = max(6.0, side * 0.8)
            w = max(6, min(width - 1, round(side * min(1.0, aspect))))
            h = max(6, min(height - 1, round(side * min(1.0, 1 / aspect))))
            box = (int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h)
            if _overlap_ok(box, boxes, 0.1):
                placed = box
                break
        boxes.append(placed if placed is not None else box)  # crowded: accept the last try
    return boxes


def _plan_split(split: str, counts: np.ndarray, classes_by_rank: list[ClassSpec], p: Preset,
                rng: np.random.Generator, first_id: int, neg_share: float | None = None) -> list[ImagePlan]:
    """Deal the shuffled instances of every class to images and lay each image out."""
    labels = np.repeat(np.arange(len(counts)), counts)
    rng.shuffle(labels)
    images, start, image_id = [], 0, first_id
    lo, hi = p.objects_per_image
    while start < len(labels):
        k = min(int(rng.integers(lo, hi + 1)), len(labels) - start)
        width, height = (int(v) for v in rng.integers(p.image_size[0], p.image_size[1] + 1, size=2))
        boxes = _place_objects(rng, k, width, height, p)
        objects = [ObjectPlan(classes_by_rank[r].category_id, b) for r, b in zip(labels[start:start + k], boxes)]
        images.append(ImagePlan(image_id, split, width, height, objects))
        start += k
        image_id += 1

    # Not exhaustive: in a few images with a class present twice or more, leave one instance unannotated.
    candidates = [img for img in images if max(Counter(o.category_id for o in img.objects).values()) >= 2]
    n_pick = min(len(candidates), round(p.not_exhaustive_fraction * len(images)))
    for i in sorted(rng.choice(len(candidates), size=n_pick, replace=False).tolist()):
        img = candidates[i]
        counts_in = Counter(o.category_id for o in img.objects)
        dup = sorted(cid for cid, n in counts_in.items() if n >= 2)
        cid = dup[int(rng.integers(len(dup)))]
        which = [j for j, o in enumerate(img.objects) if o.category_id == cid]
        img.objects[which[int(rng.integers(len(which)))]].annotated = False
        img.not_exhaustive_category_ids = [cid]

    # Negatives: a random share of the classes verified absent (drawn objects included): exactly
    # round(neg_fraction x absent) of them (neg_share None, the preset's density), or each with probability
    # neg_share. They are the split's last draws, so the density changes nothing else.
    num_ids = max(c.category_id for c in classes_by_rank)
    for img in images:
        is_absent = np.ones(num_ids + 1, dtype=bool)
        is_absent[0] = False
        is_absent[[o.category_id for o in img.objects]] = False
        absent = np.flatnonzero(is_absent)
        if neg_share is None:
            n_neg = round(p.neg_fraction * len(absent))
        else:
            n_neg = int(rng.binomial(len(absent), neg_share))
        img.neg_category_ids = np.sort(rng.choice(absent, size=n_neg, replace=False)).tolist()
    return images


def negatives_share(negatives: str | float) -> float | None:
    """The share of absent classes ``negatives`` lists: None for ``preset`` (the preset's ``neg_fraction``,
    an exact count per image), :data:`LVIS_NEG_SHARE` for ``lvis``, else the number itself (in [0, 1])."""
    if isinstance(negatives, str):
        if negatives == "preset":
            return None
        if negatives == "lvis":
            return LVIS_NEG_SHARE
        try:
            negatives = float(negatives)
        except ValueError:
            raise ValueError(f"negatives must be one of {NEGATIVES} or a share in [0, 1], got {negatives!r}") from None
    if isinstance(negatives, bool) or not isinstance(negatives, (int, float)) or not 0.0 <= float(negatives) <= 1.0:
        raise ValueError(f"negatives must be one of {NEGATIVES} or a share in [0, 1], got {negatives!r}")
    return float(negatives)


def val_file_name(negatives: str | float = "preset") -> str:
    """The val annotation file (under ``annotations/``) with ``negatives``: ``val.json`` for ``preset``,
    ``val_neg-lvis.json``, ``val_neg-0.05.json`` (a share, as ``%g``) otherwise."""
    share = negatives_share(negatives)
    if share is None:
        return "val.json"
    return "val_neg-lvis.json" if negatives == "lvis" else f"val_neg-{share:g}.json"


def plan_dataset(preset: str | Preset = "small", seed: int = 0, negatives: str | float = "preset") -> DatasetPlan:
    """Decide classes, counts, image sizes, boxes and federated ids for (preset, seed); draws nothing.

    Train image ids are 1..N_train, val ids follow, so ids are unique across splits. ``negatives``: the val
    split's density of verified-absent classes (see the module docstring; the train split always has the
    preset's). Everything but the val split's ``neg_category_ids`` is the same for every ``negatives``.
    Raises ``ValueError`` if the plan leaves a frequency or instance bin that the preset guarantees empty.
    """
    p = get_preset(preset)
    neg_share = negatives_share(negatives)
    design_ss, train_ss, val_ss = np.random.SeedSequence(int(seed)).spawn(3)
    classes = design_classes(p, np.random.default_rng(design_ss))
    by_rank = sorted(classes, key=lambda c: c.rank)
    train_counts = plan_instance_counts(p)
    val_counts = np.maximum(p.val_min_instances, np.round(p.val_fraction * train_counts)).astype(int)
    train = _plan_split("train", train_counts, by_rank, p, np.random.default_rng(train_ss), 1)
    val = _plan_split("val", val_counts, by_rank, p, np.random.default_rng(val_ss), len(train) + 1, neg_share)
    plan = DatasetPlan(p, int(seed), classes, {"train": train, "val": val})

    s = plan.summary()
    missing = [f for f in p.required_frequencies if s["frequency_bins"][f] == 0]
    missing += [name for name in (INSTANCE_BIN_NAMES[i] for i in p.required_instance_bins)
                if s["instance_bins"][name] == 0]
    if missing:
        raise ValueError(f"synthetic preset {p.name!r} seed {seed}: empty bins {missing}; adjust the preset")
    return plan


# ----------------------------------------------------------------------------------------------------
# Rendering


def _unit_polygon(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Scale a polygon so its bounding box is exactly [0, 1]^2 (tight boxes for every shape)."""
    xs, ys = zip(*points)
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


_STAR = _unit_polygon([((1.0 if i % 2 == 0 else 0.45) * math.cos(math.radians(-90 + 36 * i)),
                        (1.0 if i % 2 == 0 else 0.45) * math.sin(math.radians(-90 + 36 * i))) for i in range(10)])
_POLYGONS = {
    "triangle": [[(0.5, 0), (1, 1), (0, 1)]],
    "diamond": [[(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]],
    "star": [_STAR],
    "cross": [[(0.33, 0), (0.67, 0), (0.67, 1), (0.33, 1)], [(0, 0.33), (1, 0.33), (1, 0.67), (0, 0.67)]],
    "hourglass": [[(0, 0), (1, 0), (0.5, 0.5)], [(0.5, 0.5), (1, 1), (0, 1)]],
}


def shape_mask(shape: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of ``shape`` filling a w x h box."""
    im = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(im)
    wm, hm = w - 1, h - 1
    inner = [0.28 * wm, 0.28 * hm, 0.72 * wm, 0.72 * hm]
    if shape in ("circle", "ring"):
        d.ellipse([0, 0, wm, hm], fill=255)
        if shape == "ring":
            d.ellipse(inner, fill=0)
    elif shape in ("square", "frame"):
        d.rectangle([0, 0, wm, hm], fill=255)
        if shape == "frame":
            d.rectangle(inner, fill=0)
    elif shape == "halfdisk":
        d.pieslice([0, 0, wm, 2 * hm], 180, 360, fill=255)
    elif shape in _POLYGONS:
        for poly in _POLYGONS[shape]:
            d.polygon([(x * wm, y * hm) for x, y in poly], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return np.asarray(im) > 127


def texture_mask(texture: str, w: int, h: int) -> np.ndarray:
    """Boolean (h, w) mask of the pixels drawn in the secondary colour: none, diagonal stripes or dots."""
    if texture == "solid":
        return np.zeros((h, w), dtype=bool)
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(4, round(min(w, h) / 4))
    if texture == "striped":
        return (xx + yy) % period < period // 2
    if texture == "dotted":
        period = max(5, period)
        c = (period - 1) / 2
        return (xx % period - c) ** 2 + (yy % period - c) ** 2 <= (0.32 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}; known: {', '.join(TEXTURES)}")


def _secondary(rgb: tuple[int, int, int]) -> np.ndarray:
    """Stripe/dot colour: a dark shade of the class colour, or light grey for very dark colours."""
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.full(3, 215.0) if lum < 80 else np.asarray(rgb, dtype=float) * 0.35


def render_image(img: ImagePlan, classes: dict[int, ClassSpec], seed: int) -> Image.Image:
    """Draw one planned image: tinted grey background with soft blotches, the objects, pixel noise."""
    rng = np.random.default_rng([int(seed), 2, img.id])
    w, h = img.width, img.height
    base = rng.uniform(110, 170) + rng.uniform(-10, 10, size=3)
    blotch = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    blotch = np.asarray(Image.fromarray(blotch, "RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
    canvas = (base + 0.12 * (blotch - 128)).astype(np.float32)
    for obj in img.objects:
        spec = classes[obj.category_id]
        x, y, bw, bh = obj.box
        colour = np.asarray(spec.rgb, dtype=float) + rng.integers(-8, 9, size=3)
        region = canvas[y:y + bh, x:x + bw]
        mask = shape_mask(spec.shape, bw, bh)
        pixels = np.where(texture_mask(spec.texture, bw, bh)[..., None], _secondary(spec.rgb), colour)
        region[mask] = pixels[mask]
    canvas += rng.normal(0.0, 3.0, size=canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _render_batch(args: tuple[str, list[ImagePlan], dict[int, ClassSpec], int]) -> int:
    image_dir, images, classes, seed = args
    for img in images:
        render_image(img, classes, seed).save(Path(image_dir) / img.relative_path, format="PNG", compress_level=1)
    return len(images)


# ----------------------------------------------------------------------------------------------------
# Writing


def lvis_json(plan: DatasetPlan, split: str, annotation_id_start: int = 1) -> dict:
    """The LVIS v1 dict of one split (categories with train counts in both splits, as LVIS does)."""
    images, annotations = [], []
    ann_id = annotation_id_start
    for img in plan.splits[split]:
        url = f"{URL_ROOT}/{img.relative_path}"
        images.append({
            "id": img.id, "width": img.width, "height": img.height, "license": 1,
            "coco_url": url, "flickr_url": url, "date_captured": "2024-01-01 00:00:00",
            "neg_category_ids": img.neg_category_ids,
            "not_exhaustive_category_ids": img.not_exhaustive_category_ids,
        })
        for o in img.objects:
            if not o.annotated:
                continue
            x, y, w, h = (float(v) for v in o.box)
            annotations.append({
                "id": ann_id, "image_id": img.id, "category_id": o.category_id,
                "bbox": [x, y, w, h], "area": w * h,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
            ann_id += 1
    return {
        "info": {"description": f"stepwise synthetic long-tailed set, preset {plan.preset.name}, seed {plan.seed}",
                 "url": URL_ROOT, "version": str(FORMAT_VERSION), "year": 2024,
                 "contributor": "stepwise", "date_created": "2024-01-01"},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": plan.categories(),
    }


def format_summary(summary: dict) -> str:
    """A few human-readable lines from :meth:`DatasetPlan.summary`."""
    f, b = summary["frequency_bins"], summary["instance_bins"]
    lines = [f"synthetic preset={summary['preset']} seed={summary['seed']}: {summary['classes']} classes "
             f"({summary['twins']} look-alike tail twins)",
             f"  classes per frequency bin (train images): r={f['r']} c={f['c']} f={f['f']}",
             "  classes per train instance bin: " + " ".join(f"{k}:{v}" for k, v in b.items())]
    for split in ("train", "val"):
        s = summary[split]
        lines.append(f"  {split}: {s['images']} images, {s['instances']} instances "
                     f"(+{s['unannotated']} drawn unannotated), {s['classes_present']} classes, "
                     f">= {s['min_instances_per_class']} instances per class")
    return "\n".join(lines)


def _default_workers() -> int:
    """Rendering processes: the CPUs this process may use, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus))


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _init_worker() -> None:
    """Rendering worker: leave Ctrl-C to the parent (which terminates the pool), and on Linux die with the
    parent even when it is killed with SIGKILL (a worker would otherwise block forever on its queue)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):  # no libc prctl: the parent's terminate() still covers other exits
            pass
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)


def _write_dataset(root: Path, plan: DatasetPlan, workers: int, verbose: bool = True) -> None:
    for folder in SPLIT_FOLDERS.values():
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
    classes = {c.category_id: c for c in plan.classes}
    images = plan.splits["train"] + plan.splits["val"]
    chunk = 64
    jobs = [(str(root / "images"), images[i:i + chunk], classes, plan.seed) for i in range(0, len(images), chunk)]
    sizes = [len(job[1]) for job in jobs]
    with tqdm(total=len(images), unit="img", desc=f"render {plan.preset.name}", disable=not verbose) as bar:
        if workers <= 1:
            for job, size in zip(jobs, sizes):
                _render_batch(job)
                bar.update(size)
        else:
            # multiprocessing.Pool: leaving the with-block (normally or by any exception, a signal turned into
            # SystemExit included) terminates the workers at once instead of letting queued jobs finish.
            with multiprocessing.Pool(workers, initializer=_init_worker) as pool:
                for size in pool.imap_unordered(_render_batch, jobs):
                    bar.update(size)
    train = lvis_json(plan, "train")
    atomic_write_json(root / "annotations" / "train.json", train)
    atomic_write_json(root / "annotations" / "val.json", lvis_json(plan, "val", len(train["annotations"]) + 1))
    meta = {"format_version": FORMAT_VERSION, "preset": plan.preset.name, "seed": plan.seed,
            "preset_params": asdict(plan.preset), "summary": plan.summary(),
            "classes": [asdict(c) for c in plan.classes]}
    atomic_write_json(root / META_FILE, meta, indent=1)


def generate(out_dir: str | os.PathLike, preset: str | Preset = "small", seed: int = 0,
             workers: int | None = None, verbose: bool = True) -> Path:
    """Render the (preset, seed) data set into ``out_dir``, which must not exist yet (or be empty).

    Everything is written into a temporary sibling directory that is renamed onto ``out_dir`` at the
    end, so an interrupted run leaves no ``out_dir``. The temporary directory and the rendering workers go
    away on any exit: an exception, Ctrl-C, SIGTERM or SIGHUP (turned into exceptions while this runs
    in the main thread with the default handlers); after a SIGKILL the workers die with their parent
    (Linux) and the next call removes the dead process's temporary directory. ``workers`` processes
    render images (default: up to 8 CPUs); the bytes do not depend on it. Returns ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"synthetic data output {out} already exists and is not empty")
    plan = plan_dataset(preset, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    with exit_on_signals() as received:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        try:
            _write_dataset(tmp, plan, _default_workers() if workers is None else workers, verbose)
            if received:  # interrupted, but the handler's exception was dropped (see exit_on_signals)
                raise_for_signal(received[0])
            if out.exists():
                out.rmdir()  # empty, checked above
            os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"wrote {out}\n{format_summary(plan.summary())}", flush=True)
    return out


_TEMP_PID = re.compile(r"\.tmp-(\d+)-")


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporary siblings of ``out`` left by generating processes that no longer exist."""
    removed = []
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        match = _TEMP_PID.search(tmp.name[len(out.name) + 1:])
        if match and tmp.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def read_meta(root: str | os.PathLike) -> dict | None:
    """The ``synthetic.json`` of a complete data set, or None when ``root`` holds none."""
    path = Path(root) / META_FILE
    return read_json(path, "synthetic data description") if path.is_file() else None


def ensure_synthetic(root: str | os.PathLike, preset: str | Preset = "small", seed: int = 0,
                     workers: int | None = None, verbose: bool = True, negatives: str | float = "preset") -> Path:
    """Return ``root`` holding the (preset, seed) data set, generating it on first use.

    A no-op when ``root`` is complete for the same preset and seed. Raises ``FileExistsError`` when
    ``root`` holds something else (another preset/seed, or files that are not a complete data set), so
    nothing the user made is overwritten. Safe when several processes call it at once. With ``negatives``
    other than ``preset`` the val file of that density (:func:`write_val_negatives`) is written too, once.
    """
    p = get_preset(preset)
    root = Path(root)
    negatives_share(negatives)  # a bad value fails before anything is rendered
    made = _ensure_base(root, p, seed, workers, verbose)
    if negatives_share(negatives) is not None:
        write_val_negatives(made, p, seed, negatives, verbose)
    return made


def write_val_negatives(root: str | os.PathLike, preset: str | Preset, seed: int, negatives: str | float,
                        verbose: bool = True) -> Path:
    """Write ``annotations/<val_file_name(negatives)>`` of a generated data set unless it exists: the val
    split of (preset, seed) with that density of ``neg_category_ids``, everything else as ``val.json``
    (annotation ids included). Returns its path."""
    path = Path(root) / "annotations" / val_file_name(negatives)
    if path.is_file():
        return path
    plan = plan_dataset(preset, seed, negatives)
    train_annotations = sum(o.annotated for img in plan.splits["train"] for o in img.objects)
    data = lvis_json(plan, "val", train_annotations + 1)
    atomic_write_json(path, data)
    if verbose:
        n = sum(len(i["neg_category_ids"]) for i in data["images"])
        print(f"wrote {path}: {n / max(len(data['images']), 1):.2f} verified-absent classes per val image", flush=True)
    return path


def _ensure_base(root: Path, p: Preset, seed: int, workers: int | None, verbose: bool) -> Path:
    """:func:`ensure_synthetic` without the extra val file."""

    def check(meta: dict) -> Path:
        found = (meta.get("preset"), meta.get("seed"), meta.get("format_version"))
        if found != (p.name, int(seed), FORMAT_VERSION):
            raise FileExistsError(
                f"{root} holds synthetic data preset={meta.get('preset')} seed={meta.get('seed')} "
                f"format={meta.get('format_version')}, not preset={p.name} seed={seed} format={FORMAT_VERSION}; "
                "use another root or delete it")
        return root

    meta = read_meta(root)
    if meta is not None:
        return check(meta)
    try:
        return generate(root, p, seed, workers=workers, verbose=verbose)
    except (FileExistsError, OSError):
        meta = read_meta(root)  # another process may have finished first
        if meta is None:
            raise
        return check(meta)


def load_split(root: str | os.PathLike, split: str) -> dict:
    """Read ``annotations/<split>.json`` of a generated data set."""
    return read_json(Path(root) / "annotations" / f"{split}.json", f"synthetic {split} annotations")


__all__ = [
    "PRESETS", "Preset", "ClassSpec", "ObjectPlan", "ImagePlan", "DatasetPlan", "plan_instance_counts",
    "design_classes", "plan_dataset", "render_image", "shape_mask", "texture_mask", "lvis_json",
    "generate", "ensure_synthetic", "read_meta", "load_split", "format_summary", "frequency_of",
    "instance_bin", "LVIS_NEG_SHARE", "NEGATIVES", "negatives_share", "val_file_name", "write_val_negatives",
]
