"""The emoji benchmark's vocabulary: presets, families of look-alikes derived from Unicode's metadata, the
classes chosen from them with LVIS's frequency fractions, and the distractor emoji outside them."""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stepwise.data.generate.common import preset_named
from stepwise.data.generate.emoji_artwork import SKIN_TONES, Artwork, Emoji

# LVIS v1: 337 rare, 461 common, 405 frequent of 1,203 classes.
LVIS_V1_BINS = {"r": 337, "c": 461, "f": 405}
# Training images per class (f: 102 to preset.max_images). Common and frequent start one image above LVIS's
# thresholds, so a class whose only instance in an image ends up hidden still stays in its bin.
IMAGE_RANGES = {"r": (1, 10), "c": (12, 100)}
# Extra instances of a present class in one image, per bin f, c, r: (probability, at most this many more).
DEFAULT_EXTRA_INSTANCES = ((0.3, 2), (0.15, 2), (0.1, 2))
# Words that name the same thing inside one subgroup (car / taxi / police car are one family).
WORD_ALIASES = {"AUTOMOBILE": "CAR", "TAXI": "CAR", "CARS": "CAR"}
MIN_INK = 0.2  # classes need filled artwork: thin line art all but vanishes at 12 px (it can be a distractor)
FLAG_COLOURS = {"red": (210, 40, 40), "white": (245, 245, 245), "blue": (40, 70, 170), "green": (40, 140, 60),
                "yellow": (245, 200, 40), "black": (30, 30, 30)}


@dataclass(frozen=True)
class EmojiPreset:
    """Size and difficulty of an emoji data set.

    Training images per class: log-uniform in ``rare_images`` (default (1, 10)) for rare, (11, 100) for common
    and (101, ``max_images``) for frequent classes. Val images per class: max(``val_min_images``,
    round(``val_fraction`` x train images)). Objects: long side log-uniform in ``object_size``. Instances of a
    class in one image: 1, plus 1 to ``m`` more with probability ``q``, ``(q, m)`` of its bin in
    ``extra_instances`` (f, c, r; default ``DEFAULT_EXTRA_INSTANCES``). Options left at None keep the defaults
    (and stay out of the written ``emoji_lvis.json``, so earlier renders keep their bytes).
    """

    name: str
    num_classes: int
    max_images: int  # train images of the most frequent classes
    classes_per_image: tuple[int, int]  # annotated classes in one image, inclusive range
    distractors: tuple[int, int]  # unannotated emoji from outside the vocabulary, inclusive range
    image_size: tuple[int, int]  # inclusive range of width and of height, px
    object_size: tuple[int, int]  # range of an object's longer side, px
    val_fraction: float
    val_min_images: int
    neg_per_image: tuple[int, int]  # verified-absent classes per image, inclusive range
    not_exhaustive_fraction: float  # share of images with one instance of a repeated class unannotated
    max_family_size: int  # larger families keep a random subset of their members
    max_cover: float = 0.4  # an object covers at most this share of the box of any object drawn before it
    max_truncation: float = 0.35  # at most this share of an object's box lies outside the image
    # The balanced control: the vocabulary, r / c / f bins and val split of preset ``vocabulary`` (APr / APf
    # then compare the same classes), every class given ``balanced_images`` training images.
    # (Balanced: every class takes the common bin's instance rule.)
    vocabulary: str | None = None
    balanced_images: int | None = None
    rare_images: tuple[int, int] | None = None  # rare classes' training images (None: LVIS's (1, 10))
    extra_instances: tuple[tuple[float, int], ...] | None = None  # (q, m) of f, c, r (None: the default)


EMOJI_PRESETS: dict[str, EmojiPreset] = {
    # For tests: 24 classes (7 r / 9 c / 8 f), ~200 train images of 64-80 px, generated in seconds.
    "tiny": EmojiPreset(
        name="tiny", num_classes=24, max_images=140, classes_per_image=(3, 7), distractors=(0, 2),
        image_size=(64, 80), object_size=(12, 32), val_fraction=0.1, val_min_images=4,
        neg_per_image=(2, 5), not_exhaustive_fraction=0.05, max_family_size=6,
    ),
    # The README demo: 60 classes (17 r / 23 c / 20 f), ~900 train images of 96-128 px.
    "demo": EmojiPreset(
        name="demo", num_classes=60, max_images=250, classes_per_image=(3, 7), distractors=(1, 3),
        image_size=(96, 128), object_size=(12, 48), val_fraction=0.1, val_min_images=10,
        neg_per_image=(3, 8), not_exhaustive_fraction=0.03, max_family_size=8,
    ),
    # The study size for 2-core CPUs: 160 classes (45 r / 61 c / 54 f), ~1,900 train images of 72-96 px as
    # the `study` preset of the shape data, with more objects per image. Calibrated (docs/emoji_lvis.md): with
    # LVIS's 1-10 images per rare class and the default instance rule a converged baseline had APr / APf =
    # 0.51 (LVIS v1: 0.36), so rare classes take 1-5 images and frequent ones LVIS-like crowds (half of their
    # images hold 2-5 instances), rare ones a single instance.
    "study": EmojiPreset(
        name="study", num_classes=160, max_images=220, classes_per_image=(4, 8), distractors=(1, 3),
        image_size=(72, 96), object_size=(10, 40), val_fraction=0.1, val_min_images=15,
        neg_per_image=(3, 8), not_exhaustive_fraction=0.03, max_family_size=10,
        rare_images=(1, 5), extra_instances=((0.5, 4), (0.2, 2), (0.0, 0)),
    ),
    # The balanced control of `study` (docs/emoji_lvis.md): its 160 classes, bins and val split, every class
    # in 70 training images (the study set's mean: a common class's count, and about as many images).
    "study_balanced": EmojiPreset(
        name="study_balanced", num_classes=160, max_images=220, classes_per_image=(4, 8), distractors=(1, 3),
        image_size=(72, 96), object_size=(10, 40), val_fraction=0.1, val_min_images=15,
        neg_per_image=(3, 8), not_exhaustive_fraction=0.03, max_family_size=10,
        vocabulary="study", balanced_images=70, extra_instances=((0.5, 4), (0.2, 2), (0.0, 0)),
    ),
    # LVIS size for GPUs: 1,203 classes (337 r / 461 c / 405 f), ~23,000 train images of 128-192 px.
    "lvis": EmojiPreset(
        name="lvis", num_classes=1203, max_images=1000, classes_per_image=(5, 11), distractors=(1, 4),
        image_size=(128, 192), object_size=(12, 80), val_fraction=0.05, val_min_images=8,
        neg_per_image=(3, 10), not_exhaustive_fraction=0.03, max_family_size=12,
    ),
}


def get_preset(preset: str | EmojiPreset) -> EmojiPreset:
    """Look a preset up by name (the error lists the known ones) or pass an :class:`EmojiPreset` through."""
    return preset_named(preset, EMOJI_PRESETS, EmojiPreset, "emoji")


def bin_sizes(num_classes: int) -> dict[str, int]:
    """Classes per frequency bin with LVIS v1's fractions: {'r': n_r, 'c': n_c, 'f': n_f}."""
    total = sum(LVIS_V1_BINS.values())
    n_r = round(num_classes * LVIS_V1_BINS["r"] / total)
    n_f = round(num_classes * LVIS_V1_BINS["f"] / total)
    return {"r": n_r, "c": num_classes - n_r - n_f, "f": n_f}


# ----------------------------------------------------------------------------------------------------
# Families and vocabulary


def _name_words(name: str, subgroup: str) -> list[str]:
    """Upper-case words of a base name that decide its family (gender, 'oncoming', 'face' dropped)."""
    words = re.sub(r"[^A-Z0-9 ]+", " ", name.upper()).split()
    if len(words) > 1 and words[0] in ("MAN", "WOMAN", "PERSON", "MEN", "WOMEN", "PEOPLE"):
        words = words[1:]
    if len(words) > 1 and words[0] == "ONCOMING":
        words = words[1:]
    if len(words) > 1 and words[-1] == "FACE" and subgroup.startswith(("animal", "cat-face", "monkey-face")):
        words = words[:-1]
    return [WORD_ALIASES.get(w, w) for w in words] or ["X"]


def flag_colours(sprite: Image.Image) -> str:
    """The two most common of six flag colours in an emoji's opaque pixels, e.g. 'red+white'."""
    rgba = np.asarray(sprite.convert("RGBA"), dtype=np.float32)
    pixels = rgba[rgba[..., 3] > 200][:, :3]
    palette = np.asarray(list(FLAG_COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(palette))
    counts[list(FLAG_COLOURS).index("black")] //= 4  # outlines are black in every OpenMoji flag
    top = sorted(np.argsort(-counts, kind="stable")[:2].tolist())
    return "+".join(list(FLAG_COLOURS)[i] for i in top)


def derive_families(artwork: Artwork) -> dict[str, list[str]]:
    """{family: [hexcodes]} over every named emoji, from Unicode subgroups and names.

    Skin-tone variants join their base emoji's family. Inside a subgroup, base emoji whose first two words
    are shared by >= 3 (the clock faces), else whose last word is shared (red / green apple, police car /
    taxi / automobile, dog / dog face), else whose first word is shared, form a family; the rest of the
    subgroup is one family. Country flags are grouped by their two main colours (computed from the artwork).
    """
    named = [e for e in artwork.emoji.values() if e.name]
    bases = sorted({e.base for e in named})
    by_subgroup: dict[str, list[str]] = defaultdict(list)
    for h in bases:
        by_subgroup[artwork.emoji[h].subgroup].append(h)
    family_of: dict[str, str] = {}
    for subgroup, members in sorted(by_subgroup.items()):
        if subgroup == "country-flag":
            for h in members:
                family_of[h] = f"flag {flag_colours(artwork.sprite(h, 48))}"
            continue
        words = {h: _name_words(artwork.emoji[h].name, subgroup) for h in members}
        pre2 = Counter(" ".join(w[:2]) for w in words.values() if len(w) > 2)
        last = Counter(w[-1] for w in words.values())
        first = Counter(w[0] for w in words.values() if len(w) > 1)
        for h, w in words.items():
            if len(w) > 2 and pre2[" ".join(w[:2])] >= 3:
                key = " ".join(w[:2])
            elif last[w[-1]] >= 2:
                key = w[-1]
            elif len(w) > 1 and first[w[0]] >= 2:
                key = w[0]
            else:
                key = "other"
            family_of[h] = f"{subgroup}: {key.lower()}"
    families: dict[str, list[str]] = defaultdict(list)
    for e in sorted(named, key=lambda e: e.hexcode):
        families[family_of[e.base]].append(e.hexcode)
    return dict(families)


@dataclass(frozen=True)
class EmojiClass:
    """One category: LVIS id (1..C, alphabetical by name), the emoji, its family and planned frequency."""

    category_id: int
    name: str
    hexcode: str
    family: str
    planned_frequency: str  # 'r' | 'c' | 'f'
    planned_images: int  # training images
    group: str
    subgroup: str
    synonyms: tuple[str, ...]


def _class_name(e: Emoji) -> str:
    """LVIS-style name: ASCII lower case words joined by '_' ('São Tomé & Príncipe Flag' -> sao_tome_and_...)."""
    ascii_name = unicodedata.normalize("NFKD", e.name.replace("&", " and ")).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")


def _family_order(artwork: Artwork, families: dict[str, list[str]], rng: np.random.Generator) -> list[str]:
    """Families in the order the vocabulary takes them: one family of each Unicode group in turn (groups
    and the families inside each in random order), so that every vocabulary spreads over smileys, people,
    animals, food, travel, activities, objects, symbols and flags instead of filling up with the large
    skin-tone families of people."""
    by_group: dict[str, list[str]] = defaultdict(list)
    for fam in sorted(families):
        by_group[artwork.emoji[families[fam][0]].group].append(fam)
    groups = [sorted(by_group)[i] for i in rng.permutation(len(by_group))]
    shuffled = {g: [by_group[g][i] for i in rng.permutation(len(by_group[g]))] for g in groups}
    return [shuffled[g][k] for k in range(max(map(len, shuffled.values()))) for g in groups if k < len(shuffled[g])]


def build_vocabulary(artwork: Artwork, preset: str | EmojiPreset, rng: np.random.Generator) -> list[EmojiClass]:
    """Choose whole families (their members with ``MIN_INK`` or more, at most ``max_family_size`` of them;
    :func:`_family_order`) until ``num_classes``, then deal frequencies round-robin over family positions:
    position 0 of every family (largest families first) takes the frequent slots first, later positions the
    common, then the rare ones; so a rare class sits at the end of a family whose head is frequent. Training
    image counts are log-uniform in each bin."""
    p = get_preset(preset)
    families = derive_families(artwork)
    order = _family_order(artwork, families, rng)
    chosen: list[tuple[str, list[str]]] = []
    total = 0
    for fam in order:
        members = [h for h in families[fam] if artwork.ink(h) >= MIN_INK]
        if len(members) < 2:
            continue
        if len(members) > p.max_family_size:
            members = sorted(rng.choice(members, size=p.max_family_size, replace=False).tolist())
        take = min(len(members), p.num_classes - total)
        if p.num_classes - total - take == 1:  # never leave one class to fill: no family has one member
            take -= 1
        if take < 2:
            continue
        members = members[:take]
        chosen.append((fam, [members[i] for i in rng.permutation(len(members))]))
        total += len(members)
        if total == p.num_classes:
            break
    if total != p.num_classes:
        raise ValueError(f"emoji preset {p.name!r}: only {total} classes in families, {p.num_classes} asked")

    sizes = bin_sizes(p.num_classes)
    tiers = ["f"] * sizes["f"] + ["c"] * sizes["c"] + ["r"] * sizes["r"]
    chosen.sort(key=lambda fm: -len(fm[1]))  # stable: equal sizes keep the random order
    slots = [(pos, fi) for pos in range(max(len(m) for _, m in chosen)) for fi, (_, m) in enumerate(chosen)
             if pos < len(m)]
    ranges = {**IMAGE_RANGES, "r": p.rare_images or IMAGE_RANGES["r"], "f": (102, p.max_images)}
    classes = []
    for (pos, fi), tier in zip(slots, tiers):
        fam, members = chosen[fi]
        e = artwork.emoji[members[pos]]
        lo, hi = ranges[tier]
        n_img = int(np.clip(round(math.exp(rng.uniform(math.log(lo), math.log(hi + 1)) - 1e-9)), lo, hi))
        classes.append((e, fam, tier, n_img))
    named = {}
    for e, fam, tier, n_img in classes:
        name = _class_name(e)
        if name in named:  # two Unicode emoji share a name: tell them apart by hexcode
            name = f"{name}_{e.hexcode.lower()}"
        named[name] = (e, fam, tier, n_img)
    return [EmojiClass(cid, name, e.hexcode, fam, tier, n_img, e.group, e.subgroup,
                       tuple(dict.fromkeys([e.name, *e.short_names])))
            for cid, (name, (e, fam, tier, n_img)) in enumerate(sorted(named.items()), start=1)]


def distractor_pool(artwork: Artwork, classes: list[EmojiClass]) -> list[str]:
    """Emoji outside the vocabulary's families (and not a lone component glyph) to draw unannotated."""
    families = derive_families(artwork)
    used = {h for fam in {c.family for c in classes} for h in families[fam]}
    pool = []
    for h, e in sorted(artwork.emoji.items()):
        single = "-" not in h and int(h, 16) < 0x2000  # ASCII, digits, letters: too plain
        component = h in SKIN_TONES or h.startswith(("1F1E", "1F1F", "E00")) and "-" not in h
        if h not in used and not single and not component and e.group != "Component":
            pool.append(h)
    return pool
