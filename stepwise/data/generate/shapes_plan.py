"""Planning the shape data set (no pixels): instance counts, class looks, image layouts, federated lists.

:func:`plan_dataset` decides everything of a (preset, seed) data set; :mod:`.shapes_render` draws it.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

from stepwise.data.generate.common import leave_one_unannotated
from stepwise.data.generate.shapes_presets import (
    COLOURS,
    INSTANCE_BIN_NAMES,
    SHAPES,
    TEXTURES,
    Box,
    ClassSpec,
    DatasetPlan,
    ImagePlan,
    ObjectPlan,
    Preset,
    get_preset,
    negatives_share,
)


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

    # Not exhaustive: in a few images with a class present twice or more, leave one instance (of a random such
    # class) unannotated.
    leave_one_unannotated(rng, images, lambda img: img.objects, p.not_exhaustive_fraction,
                          lambda rng, dup: dup[int(rng.integers(len(dup)))])

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
