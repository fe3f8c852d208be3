"""Planning the emoji benchmark (no pixels): the vocabulary of a preset, then for a seed every image's size,
background seed, instances (look, place, drawing order) and federated lists."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from stepwise.data.generate.common import PlannedImage, leave_one_unannotated
from stepwise.data.generate.emoji_artwork import Artwork, get_artwork
from stepwise.data.generate.emoji_vocabulary import (
    DEFAULT_EXTRA_INSTANCES,
    EmojiClass,
    EmojiPreset,
    build_vocabulary,
    distractor_pool,
    get_preset,
)


@dataclass
class Instance:
    """One drawn emoji: centre, longer side, aspect (w/h stretch), rotation and look jitter."""

    hexcode: str
    category_id: int  # 0 for a distractor
    cx: float
    cy: float
    side: float
    aspect: float
    angle: float
    brightness: float
    balance: tuple[float, float, float]
    blur: float
    annotated: bool = True


@dataclass
class ImagePlan(PlannedImage):
    """One image: (id, split, width, height,) its background, instances in drawing order, federated lists."""

    background: int  # seed of the background
    instances: list[Instance]
    neg_category_ids: list[int] = field(default_factory=list)
    not_exhaustive_category_ids: list[int] = field(default_factory=list)


def _approx_box(inst: Instance) -> tuple[float, float, float, float]:
    w = inst.side * min(1.0, inst.aspect)
    h = inst.side * min(1.0, 1.0 / inst.aspect)
    return (inst.cx - w / 2, inst.cy - h / 2, w, h)


def _covers(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Share of box b covered by box a (x, y, w, h)."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(0.0, iw) * max(0.0, ih) / max(1e-6, b[2] * b[3])


def _new_instance(rng: np.random.Generator, hexcode: str, cid: int, width: int, height: int,
                  p: EmojiPreset, side: float) -> Instance:
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    w, h = side * min(1.0, aspect), side * min(1.0, 1.0 / aspect)
    # Truncation: the centre may lie up to (0.5 - max_truncation) of a side outside the inner area.
    mx, my = w * (0.5 - p.max_truncation), h * (0.5 - p.max_truncation)
    cx = rng.uniform(mx, width - mx) if width > 2 * mx else width / 2
    cy = rng.uniform(my, height - my) if height > 2 * my else height / 2
    balance = tuple(float(v) for v in rng.uniform(0.94, 1.06, size=3))
    blur = float(rng.uniform(0.3, 0.9)) if rng.random() < 0.25 else 0.0
    return Instance(hexcode, cid, float(cx), float(cy), float(side), float(aspect), float(rng.uniform(-12, 12)),
                    float(rng.uniform(0.82, 1.15)), balance, blur)


def _place(rng: np.random.Generator, placed: list[Instance], make, tries: int = 25) -> Instance | None:
    """An instance from ``make()`` that covers at most ``max_cover`` of every earlier box, or None."""
    for _ in range(tries):
        inst, limit = make()
        box = _approx_box(inst)
        if all(_covers(box, _approx_box(o)) <= limit for o in placed):
            return inst
    return None


def _plan_image(rng: np.random.Generator, image_id: int, split: str, cats: list[tuple[int, int]],
                classes: dict[int, EmojiClass], pool: list[str], p: EmojiPreset) -> ImagePlan:
    """Lay one image out: ``cats`` is [(category id, instances)]; distractors before and after them."""
    width, height = (int(v) for v in rng.integers(p.image_size[0], p.image_size[1] + 1, size=2))
    lo, hi = p.object_size
    hi = min(hi, min(width, height) * 0.6)

    def side() -> float:
        return math.exp(rng.uniform(math.log(lo), math.log(max(lo + 1, hi))))

    n_dis = int(rng.integers(p.distractors[0], p.distractors[1] + 1)) if pool else 0
    dis = [pool[int(i)] for i in rng.integers(0, len(pool), size=n_dis)] if pool else []
    before, after = dis[: (n_dis + 1) // 2], dis[(n_dis + 1) // 2:]
    placed: list[Instance] = []
    for h in before:  # background clutter: anything may cover them
        placed.append(_new_instance(rng, h, 0, width, height, p, side()))
    objects = [(cid, classes[cid].hexcode) for cid, k in cats for _ in range(k)]
    objects = [objects[i] for i in rng.permutation(len(objects))]
    forced = []
    for cid, h in objects:
        annotated = [o for o in placed if o.category_id]
        inst = _place(rng, annotated, lambda cid=cid, h=h: (_new_instance(rng, h, cid, width, height, p, side()),
                                                           p.max_cover))
        if inst is None:  # crowded: draw it last, on top, so it is never hidden
            forced.append(_new_instance(rng, h, cid, width, height, p, lo))
        else:
            placed.append(inst)
    for h in after:  # distractors in front, occluding at most max_cover of any object
        inst = _place(rng, placed, lambda h=h: (_new_instance(rng, h, 0, width, height, p, side()), p.max_cover))
        if inst is not None:
            placed.append(inst)
    return ImagePlan(image_id, split, width, height, int(rng.integers(2**31)), _keep_visible(placed + forced))


def _keep_visible(instances: list[Instance], limit: float = 0.6, rounds: int = 6) -> list[Instance]:
    """Drawing order in which no annotated instance is hidden: one whose box the boxes drawn after it cover by
    more than ``limit`` (sum over them, an over-estimate) moves to the end, on top; repeated a few rounds.
    So a class keeps the training images it was dealt (what its frequency bin is counted on)."""
    order = list(instances)
    for _ in range(rounds):
        boxes = [_approx_box(o) for o in order]
        hidden = [i for i, o in enumerate(order) if o.category_id
                  and sum(_covers(boxes[j], boxes[i]) for j in range(i + 1, len(order))) > limit]
        if not hidden:
            break
        order = [o for i, o in enumerate(order) if i not in hidden] + [order[i] for i in hidden]
    return order


def _deal(rng: np.random.Generator, images_per_class: dict[int, int], p: EmojiPreset) -> list[list[int]]:
    """Deal each class to as many distinct images as it asks; an image holds ``classes_per_image`` classes
    (the last few may hold fewer). A class already in the image being filled waits for the next one."""
    slots = np.concatenate([np.full(n, cid) for cid, n in sorted(images_per_class.items())])
    rng.shuffle(slots)
    images: list[list[int]] = []
    current: list[int] = []
    want = [int(rng.integers(p.classes_per_image[0], p.classes_per_image[1] + 1))]

    def add(cid: int) -> bool:
        """Put ``cid`` into the current image; True when that closed it."""
        current.append(cid)
        if len(current) < want[0]:
            return False
        images.append(current.copy())
        current.clear()
        want[0] = int(rng.integers(p.classes_per_image[0], p.classes_per_image[1] + 1))
        return True

    waiting: list[int] = []
    for cid in slots.tolist():
        if cid in current:
            waiting.append(cid)
        elif add(cid) and waiting:
            queued, waiting = waiting, []
            for w in queued:
                if w in current:
                    waiting.append(w)
                else:
                    add(w)
    while waiting:
        queued, waiting = waiting, []
        for w in queued:
            if w in current:
                waiting.append(w)
            else:
                current.append(w)
        images.append(current.copy())
        current.clear()
    if current:
        images.append(current.copy())
    return images


def _instances_of(rng: np.random.Generator, tier: str, p: EmojiPreset, split: str) -> int:
    """Instances of a present class in one image: 1, sometimes more (``EmojiPreset.extra_instances``). A balanced
    control's training images give every class the common bin's rule; its val split is the long-tailed one's."""
    rules = dict(zip("fcr", p.extra_instances or DEFAULT_EXTRA_INSTANCES))
    chance, most = rules["c" if p.balanced_images and split == "train" else tier]
    return 1 + int(rng.random() < chance) * int(rng.integers(1, max(most, 1) + 1))


def plan_split(rng: np.random.Generator, split: str, images_per_class: dict[int, int],
               classes: dict[int, EmojiClass], pool: list[str], p: EmojiPreset, first_id: int) -> list[ImagePlan]:
    """Every image of one split, with its federated lists."""
    families: dict[str, list[int]] = defaultdict(list)
    for c in classes.values():
        families[c.family].append(c.category_id)
    all_ids = np.asarray(sorted(classes))
    plans = []
    for k, cats in enumerate(_deal(rng, images_per_class, p)):
        pairs = [(cid, _instances_of(rng, classes[cid].planned_frequency, p, split)) for cid in sorted(cats)]
        img = _plan_image(rng, first_id + k, split, pairs, classes, pool, p)
        present = set(cats)
        n_neg = int(rng.integers(p.neg_per_image[0], p.neg_per_image[1] + 1))
        siblings = sorted({s for cid in present for s in families[classes[cid].family]} - present)
        hard = [siblings[i] for i in rng.permutation(len(siblings))[: n_neg // 2]]
        draw = rng.choice(all_ids, size=min(len(all_ids), n_neg + len(present) + len(hard)), replace=False)
        others = [int(c) for c in draw if int(c) not in present and int(c) not in hard]
        img.neg_category_ids = sorted(hard + others[: n_neg - len(hard)])
        plans.append(img)
    # Not exhaustive: one instance of a class drawn twice or more (the first such class) is left unannotated.
    leave_one_unannotated(rng, plans, lambda img: img.instances, p.not_exhaustive_fraction, lambda rng, dup: dup[0])
    return plans


@dataclass
class EmojiPlan:
    preset: EmojiPreset
    seed: int
    classes: list[EmojiClass]
    splits: dict[str, list[ImagePlan]]
    versions: dict[str, str]


def plan_dataset(preset: str | EmojiPreset = "study", seed: int = 0, artwork: Artwork | None = None) -> EmojiPlan:
    """Decide the vocabulary (fixed per preset), then images, instances and federated lists for ``seed``."""
    p = get_preset(preset)
    art = artwork or get_artwork()
    vocab_rng = np.random.default_rng(np.random.SeedSequence([20260, sum(map(ord, p.vocabulary or p.name))]))
    classes = build_vocabulary(art, p, vocab_rng)
    pool = distractor_pool(art, classes)
    by_id = {c.category_id: c for c in classes}
    train_ss, val_ss = np.random.SeedSequence(int(seed)).spawn(2)
    train_counts = {c.category_id: p.balanced_images or c.planned_images for c in classes}
    val_counts = {c.category_id: max(p.val_min_images, round(p.val_fraction * c.planned_images)) for c in classes}
    train = plan_split(np.random.default_rng(train_ss), "train", train_counts, by_id, pool, p, 1)
    val = plan_split(np.random.default_rng(val_ss), "val", val_counts, by_id, pool, p, len(train) + 1)
    return EmojiPlan(p, int(seed), classes, {"train": train, "val": val}, dict(art.versions))
